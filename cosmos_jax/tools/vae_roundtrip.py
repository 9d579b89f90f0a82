"""Encode then decode an MP4 through the Wan2.1 VAE and write the reconstruction (checks weights and video I/O).

    python tools/vae_roundtrip.py --video in.mp4 --weights /ckpts/tokenizer.pth --out recon.mp4
    python tools/vae_roundtrip.py --video in.mp4 --tiny --size 64x96 --out /tmp/recon.mp4   # random tiny VAE

Frames: the first 4k+1 of the file (at most --frames), resized to --size (HxW, default 720x1280) the way the
reference dataloader does. Prints the PSNR of the reconstruction against the resized input.
"""

from __future__ import annotations

import os
import re


import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax import cli as cli_lib
from cosmos_jax.data import video
from cosmos_jax.models import wan_vae
from cosmos_jax.weights import vae_keymap

PROG = "tools/vae_roundtrip.py"


def roundtrip(path: str, out: str, *, weights: str = "", tiny: bool = False, frames: int = 29,
              size: tuple[int, int] = video.REFERENCE_SIZE, dtype: str = "bfloat16") -> float:
    if not weights and not tiny:
        raise cli_lib.UsageError("give --weights PATH (tokenizer.pth) or --tiny for a random tiny VAE")
    info = video.probe(path)
    n = min(frames, info.num_frames)
    n = 4 * ((n - 1) // 4) + 1
    pixels = video.resize(video.read_frames(path, range(n)), size)
    if weights:  # the width is read off the file (the real tokenizer is dim 96)
        params, cfg = vae_keymap.load_vae_params(weights, dtype=jnp.dtype(dtype))
    else:
        cfg = wan_vae.WanVAEConfig.tiny(dtype=jnp.dtype(dtype))
        params = wan_vae.init_params(cfg)
    params = jax.tree.map(lambda a: jnp.asarray(a, cfg.dtype), params)
    x = wan_vae.uint8_to_unit(jnp.asarray(pixels)[None], cfg.dtype)
    latent = jax.jit(wan_vae.encode, static_argnums=2)(params, x, cfg)
    recon = np.asarray(wan_vae.unit_to_uint8(jax.jit(wan_vae.decode, static_argnums=2)(params, latent, cfg)))[0]
    video.write_video(out, recon, info.fps)
    mse = np.mean((recon.astype(np.float64) - pixels) ** 2)
    psnr = float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))
    print(f"{path}: {n} frames {size[0]}x{size[1]} -> latent {tuple(latent.shape)} -> {out}  PSNR {psnr:.2f} dB")
    return psnr


def main(argv=None) -> int:
    ap = cli_lib.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("--video", required=True, help="input video file (any format PyAV decodes)")
    ap.add_argument("--out", required=True, help="reconstruction .mp4 (H.264; written atomically)")
    ap.add_argument("--weights", default="", help="tokenizer.pth / .safetensors with the reference key names")
    ap.add_argument("--tiny", action="store_true", help="random dim-8 VAE instead of weights (smoke test)")
    ap.add_argument("--frames", type=int, default=29, help="at most this many frames (the first 4k+1 are used)")
    ap.add_argument("--size", default="720x1280", help="HxW after the reference resize (multiples of 8)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="VAE compute dtype")
    args = ap.parse_args(argv)
    m = re.fullmatch(r"(\d+)x(\d+)", args.size)
    if not m or int(m.group(1)) % 8 or int(m.group(2)) % 8 or not int(m.group(1)) or not int(m.group(2)):
        raise cli_lib.UsageError(f"--size={args.size}: expected HxW, positive multiples of 8 (e.g. 720x1280)")
    if args.frames < 1:
        raise cli_lib.UsageError(f"--frames={args.frames}: must be >= 1")
    if args.weights and not os.path.isfile(args.weights):
        raise cli_lib.UsageError(f"--weights={args.weights}: no such file")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise cli_lib.UsageError(f"--out={args.out}: the folder {out_dir} does not exist")
    size = (int(m.group(1)), int(m.group(2)))
    roundtrip(args.video, args.out, weights=args.weights, tiny=args.tiny, frames=args.frames, size=size,
              dtype=args.dtype)
    return 0


def cli() -> None:
    """The command line: errors as one line (cosmos_jax/cli.py)."""
    cli_lib.entry(main)


if __name__ == "__main__":
    cli()
