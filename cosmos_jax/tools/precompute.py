r"""Encode a dataset once: VAE latents of every video and control view, and per-view text contexts, into a cache.

    python tools/precompute.py --dataset DATASET --cache CACHE --vae-weights tokenizer.pth \
        --text-dir /ckpts/Cosmos-Reason1-7B --dit-weights model_ema_bf16.pt          # projected contexts (1024 wide)
    python tools/precompute.py --dataset assets/multiview_hdmap_posttrain_dataset --cache /tmp/cache --tiny
    python tools/precompute.py --dataset assets/multiview_hdmap_posttrain_dataset --cache /tmp/cache64 --tiny \
        --height 64 --width 96 --frames 5                                              # the same in seconds

Resumable (existing entries are skipped), progress bar, the VAE batch split over all local devices. With text, the
built-in negative prompt's one-view context is (re)written too (`negative_context.npy`, raw or projected like the
entries; the training samples' unconditional branch), also when every entry already exists: re-running on a cache
made before that file existed adds it. `--tiny`: a random width-8 VAE and no text (a smoke run; at the default
720x1280 about 14 min per sample on 2 CPU cores, peak RSS ~3.8 GB). The cache records what made it; training
refuses a cache made by other weights or settings (cosmos_jax/data/cache.py).

Memory is bounded by one view: the views of a sample are decoded, resized and encoded one at a time (one per local
device per step), never all 2 x 7 views of 29 frames at 720p at once. Every cache entry is written atomically, so a
failed or interrupted run leaves the existing entries intact and a re-run continues where it stopped.
"""

from __future__ import annotations

import os

from cosmos_jax import cli as cli_lib

PROG = "tools/precompute.py"


def _check_args(args) -> None:
    """Flags and paths, before anything heavy is loaded."""
    if not args.tiny and not args.vae_weights:
        raise cli_lib.UsageError("give --vae-weights tokenizer.pth (or --tiny for a random tiny VAE)")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value <= 0 or value % 8:
            raise cli_lib.UsageError(f"{flag}={value}: must be a positive multiple of 8 (the VAE's 8x downsampling)")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise cli_lib.UsageError(f"--frames={args.frames}: the VAE needs 4k+1 frames (5, 9, ..., 29)")
    if args.stride < 1:
        raise cli_lib.UsageError(f"--stride={args.stride}: must be >= 1")
    if args.vae_weights and not os.path.isfile(args.vae_weights):
        raise cli_lib.UsageError(f"--vae-weights={args.vae_weights}: no such file")
    if args.text_dir and not os.path.isdir(args.text_dir):
        raise cli_lib.UsageError(f"--text-dir={args.text_dir}: no such directory")
    if args.dit_weights and not args.text_dir:
        raise cli_lib.UsageError("--dit-weights projects text contexts: give --text-dir too")
    if args.dit_weights and not os.path.exists(args.dit_weights):
        raise cli_lib.UsageError(f"--dit-weights={args.dit_weights}: no such file")
    if os.path.exists(args.cache) and not os.path.isdir(args.cache):
        raise cli_lib.UsageError(f"--cache={args.cache}: exists and is not a directory")


def main(argv=None) -> int:
    ap = cli_lib.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("--dataset", required=True, help="dataset root in the reference layout "
                    "(tools/validate_dataset.py checks it)")
    ap.add_argument("--cache", required=True, help="cache directory (created; existing entries are kept)")
    ap.add_argument("--vae-weights", default="", help="Wan2.1 tokenizer.pth / .safetensors (required unless --tiny)")
    ap.add_argument("--text-dir", default="", help="local Cosmos-Reason1 / Qwen2.5-VL directory; empty: no text")
    ap.add_argument("--dit-weights", default="", help="DiT .pt/.safetensors whose crossattn_proj projects contexts")
    ap.add_argument("--tiny", action="store_true", help="random width-8 VAE (smoke runs)")
    ap.add_argument("--height", type=int, default=720, help="frame height after the reference resize (default 720)")
    ap.add_argument("--width", type=int, default=1280, help="frame width after the reference resize (default 1280)")
    ap.add_argument("--frames", type=int, default=29, help="frames per view, 4k+1 (default 29)")
    ap.add_argument("--stride", type=int, default=1, help="frame stride (the reference's fps_downsample_factor)")
    ap.add_argument("--skip-bad", action="store_true", help="skip unusable samples with a warning")
    args = ap.parse_args(argv)
    _check_args(args)

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from cosmos_jax import build
    from cosmos_jax.data import cache as cache_lib
    from cosmos_jax.data import layout
    from cosmos_jax.models import wan_vae
    from cosmos_jax.parallel import mesh as mesh_lib

    spec = layout.SampleSpec(num_frames=args.frames, stride=args.stride, height=args.height, width=args.width)
    samples = layout.index_dataset(args.dataset, spec, skip_bad=args.skip_bad)
    vae_cfg = wan_vae.WanVAEConfig.tiny(dtype=jnp.float32) if args.tiny else wan_vae.WanVAEConfig(batch_chunk=1)
    vae_params = build.init_vae_params(vae_cfg, weights=args.vae_weights)
    mesh = mesh_lib.make_mesh(data=jax.device_count(), fsdp=1)
    embedder = proj = dit_cfg = None
    if args.text_dir:
        from cosmos_jax.text import embed as text_embed

        embedder = text_embed.TextEmbedder.from_dir(args.text_dir, mesh=mesh)
        if args.dit_weights:
            from cosmos_jax.models.dit_config import DiTConfig

            dit_cfg = DiTConfig.real_2b()
            dit_params, _ = build.load_reference_params(args.dit_weights, dit_cfg)
            proj = jax.tree.map(jnp.asarray, dit_params["crossattn_proj"])
    expected = cache_lib.producer(vae_cfg=vae_cfg, vae_weights=args.vae_weights,
                                  text_cfg=embedder.cfg if embedder else None, text_dir=args.text_dir,
                                  projected_by=args.dit_weights if proj is not None else None, spec=spec)
    cache = cache_lib.Cache(args.cache, expected, create=True)
    todo = [s for s in samples if not cache.has(s.name)]
    print(f"{len(samples)} samples, {len(samples) - len(todo)} already cached, {jax.device_count()} devices")
    if embedder is not None:  # the training hook's unconditional branch (also added to caches made without it)
        cache.write_negative(cache_lib.negative_context(embedder, proj, dit_cfg))
        print(f"negative-prompt context -> {cache.negative_path()}")
    n_views = len(spec.cameras)
    for files in tqdm(todo, desc="precompute", unit="sample"):
        info = layout.sample_info(files, spec)
        clips = (layout.read_view(path, spec) for path in files.videos + files.controls)  # decoded when encoded
        latents = cache_lib.encode_clips(clips, vae_params=vae_params, vae_cfg=vae_cfg, mesh=mesh)
        cache.write(files.name, cache_lib.entry_arrays(latents, info, n_views=n_views, embedder=embedder,
                                                       proj_params=proj, dit_cfg=dit_cfg))
    return 0


def cli() -> None:
    """The command line (also the console script of pyproject.toml): errors as one line (cosmos_jax/cli.py)."""
    cli_lib.entry(main)


if __name__ == "__main__":
    cli()
