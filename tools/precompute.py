"""Encode a dataset once: VAE latents of every video and control view, and per-view text contexts, into a cache.

    python tools/precompute.py --dataset DATASET --cache CACHE --vae-weights tokenizer.pth \
        --text-dir /ckpts/Cosmos-Reason1-7B --dit-weights model_ema_bf16.pt          # projected contexts (1024 wide)
    python tools/precompute.py --dataset assets/multiview_hdmap_posttrain_dataset --cache /tmp/cache --tiny

Resumable (existing entries are skipped), progress bar, the VAE batch split over all local devices. `--tiny`: a
random width-8 VAE and no text (a smoke run). The cache records what made it; training refuses a cache made by
other weights or settings (cosmos_jax/data/cache.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--vae-weights", default="")
    ap.add_argument("--text-dir", default="", help="local Cosmos-Reason1 / Qwen2.5-VL directory; empty: no text")
    ap.add_argument("--dit-weights", default="", help="DiT .pt/.safetensors whose crossattn_proj projects contexts")
    ap.add_argument("--tiny", action="store_true", help="random width-8 VAE (smoke runs)")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--frames", type=int, default=29)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--skip-bad", action="store_true", help="skip unusable samples with a warning")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from cosmos_jax.data import cache as cache_lib
    from cosmos_jax.data import layout
    from cosmos_jax import build
    from cosmos_jax.models import wan_vae
    from cosmos_jax.parallel import mesh as mesh_lib

    if not args.tiny and not args.vae_weights:
        raise SystemExit("give --vae-weights tokenizer.pth (or --tiny for a random tiny VAE)")
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
    for files in tqdm(todo, desc="precompute", unit="sample"):
        sample = layout.load_sample(files, spec)
        cache.write(files.name, cache_lib.encode_entry(sample, vae_params=vae_params, vae_cfg=vae_cfg,
                                                       n_views=len(spec.cameras), embedder=embedder,
                                                       proj_params=proj, dit_cfg=dit_cfg, mesh=mesh))
    return 0


if __name__ == "__main__":
    sys.exit(main())
