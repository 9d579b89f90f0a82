"""Wan2.1 VAE encode / decode of 29-frame 720p (720x1280) views on one GPU, bf16, against diffusers in the same run.

    python bench/bench_vae.py                                   # every part below, one subprocess each
    python bench/bench_vae.py --parts matmul,jax-encode --impl fold2d --views 1 --out /tmp/vae.jsonl

Parts (each in its own process, so each peak memory is that measurement's own, weights and input included):
  matmul            8192^3 bf16 matmul rate: the baseline for "achieved TFLOP/s / matmul rate"
  convs             the conv shapes of the VAE alone (fold2d vs conv3d) and RMSNorm+SiLU bandwidth: what limits it
  jax-encode/decode models.wan_vae.encode / decode, jit, random weights, --views videos of 29 frames
  diffusers-encode/decode  diffusers' AutoencoderKLWan (Wan2.1 config, random weights, bf16, torch.no_grad) on
                    the same shapes: the PyTorch implementation users would otherwise pick

Reported: seconds (median of --iters after a warm-up), frames/s, peak memory (JAX memory_stats
peak_bytes_in_use / torch.cuda.max_memory_allocated), achieved TFLOP/s from models.wan_vae.flops (convs +
attention matmuls, 2 x MACs) and its ratio to the matmul rate, and the JAX/diffusers frames/s ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import emit, run_isolated  # noqa: E402

FRAMES, HEIGHT, WIDTH = 29, 720, 1280
ALL_PARTS = ("matmul", "convs", "jax-encode", "jax-decode", "diffusers-encode", "diffusers-decode")


def part_matmul(args) -> None:
    from bench.common import best_matmul_rate

    emit({"part": "matmul", "flops_per_s": best_matmul_rate()})


def part_convs(args) -> None:
    """Each distinct 3x3x3 conv of the 720p VAE alone, both formulations, plus RMSNorm+SiLU bandwidth."""
    import jax
    import jax.numpy as jnp

    from bench.common import timeit
    from cosmos_jax.models import wan_vae

    shapes = [  # (frames in incl. 2 cache frames, H, W, C_in, C_out): encoder/decoder stages at 4 output frames
        (6, 720, 1280, 96, 96), (6, 360, 640, 192, 192), (4, 180, 320, 384, 384), (3, 90, 160, 384, 384),
        (6, 720, 1280, 3, 96), (6, 720, 1280, 96, 3), (6, 720, 1280, 96, 16)]
    for t, h, w, ci, co in shapes:
        x = jax.random.normal(jax.random.key(0), (1, t, h, w, ci), jnp.bfloat16)
        k = jax.random.normal(jax.random.key(1), (3, 3, 3, ci, co), jnp.bfloat16) * 0.05
        fl = 2.0 * (t - 2) * h * w * 27 * ci * co
        for impl in wan_vae.CONV_IMPLS:
            f = jax.jit(lambda x, k, impl=impl: wan_vae._conv(x, k, strides=(1, 1, 1), padding=((1, 1), (1, 1)),
                                                               impl=impl))
            s = timeit(f, x, k, warmup=2, iters=10)
            emit({"part": "convs", "shape": [t, h, w, ci, co], "impl": impl, "s": s, "flops_per_s": fl / s})
        norm = wan_vae.RMSNorm(jnp.bfloat16)
        p = norm.init(jax.random.key(0), x[:, :1])
        f = jax.jit(lambda p, x: wan_vae._silu(norm.apply(p, x)))
        s = timeit(f, p, x, warmup=2, iters=10)
        emit({"part": "convs", "shape": [t, h, w, ci, co], "impl": "rmsnorm_silu", "s": s,
               "bytes_per_s": 2 * x.size * 2 / s})


def part_jax(args, which: str) -> None:
    import jax
    import jax.numpy as jnp

    from bench.common import timeit
    from cosmos_jax.models import wan_vae

    cfg = wan_vae.WanVAEConfig(conv_impl=args.impl, encode_chunk=args.encode_chunk, decode_chunk=args.decode_chunk,
                               batch_chunk=args.batch_chunk)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), wan_vae.init_params(cfg))
    t_lat = wan_vae.latent_frames(FRAMES)
    if which == "encode":
        x = jax.random.uniform(jax.random.key(0), (args.views, FRAMES, HEIGHT, WIDTH, 3), jnp.bfloat16, -1, 1)
        fn = jax.jit(lambda p, x: wan_vae.encode(p, x, cfg))
        fl = wan_vae.flops(cfg, FRAMES, HEIGHT, WIDTH, "encode") * args.views
    else:
        x = jax.random.normal(jax.random.key(0), (args.views, t_lat, HEIGHT // 8, WIDTH // 8, 16), jnp.float32)
        fn = jax.jit(lambda p, z: wan_vae.decode(p, z, cfg))
        fl = wan_vae.flops(cfg, t_lat, HEIGHT // 8, WIDTH // 8, "decode") * args.views
    t0 = time.perf_counter()
    compiled = fn.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    s = timeit(compiled, params, x, warmup=1, iters=args.iters)
    stats = jax.local_devices()[0].memory_stats() or {}
    mem = compiled.memory_analysis()
    emit({"part": f"jax-{which}", "impl": args.impl, "views": args.views, "encode_chunk": args.encode_chunk,
           "decode_chunk": args.decode_chunk, "batch_chunk": args.batch_chunk, "s": s, "compile_s": compile_s,
           "frames_per_s": args.views * FRAMES / s, "flops": fl, "flops_per_s": fl / s,
           "peak_bytes": stats.get("peak_bytes_in_use"),
           "xla_temp_bytes": getattr(mem, "temp_size_in_bytes", None)})


def part_diffusers(args, which: str) -> None:
    import torch
    from diffusers import AutoencoderKLWan

    from cosmos_jax.models import wan_vae

    torch.manual_seed(0)
    vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval()  # defaults = Wan2.1 config
    t_lat = wan_vae.latent_frames(FRAMES)
    cfg = wan_vae.WanVAEConfig()
    if which == "encode":
        x = torch.rand(args.views, 3, FRAMES, HEIGHT, WIDTH, device="cuda", dtype=torch.bfloat16) * 2 - 1
        call = lambda: vae.encode(x).latent_dist.mode()  # noqa: E731
        fl = wan_vae.flops(cfg, FRAMES, HEIGHT, WIDTH, "encode") * args.views
    else:
        x = torch.randn(args.views, 16, t_lat, HEIGHT // 8, WIDTH // 8, device="cuda", dtype=torch.bfloat16)
        call = lambda: vae.decode(x).sample  # noqa: E731
        fl = wan_vae.flops(cfg, t_lat, HEIGHT // 8, WIDTH // 8, "decode") * args.views
    times = []
    with torch.no_grad():
        for i in range(args.iters + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    s = sorted(times)[len(times) // 2]
    emit({"part": f"diffusers-{which}", "views": args.views, "s": s, "frames_per_s": args.views * FRAMES / s,
           "flops": fl, "flops_per_s": fl / s, "peak_bytes": torch.cuda.max_memory_allocated(),
           "torch": torch.__version__})


def run_part(args) -> None:
    part = args.run_part
    if part == "matmul":
        part_matmul(args)
    elif part == "convs":
        part_convs(args)
    elif part.startswith("jax-"):
        part_jax(args, part.split("-")[1])
    elif part.startswith("diffusers-"):
        part_diffusers(args, part.split("-")[1])
    else:
        raise SystemExit(f"unknown part {part!r}; parts: {ALL_PARTS}")


def summarize(records: list[dict]) -> str:
    mm = next((r["flops_per_s"] for r in records if r["part"] == "matmul"), None)
    gib = 2 ** 30
    lines = [f"matmul baseline: {mm / 1e12:.0f} TFLOP/s" if mm else "matmul baseline: not run"]
    for r in records:
        if r["part"] == "convs":
            if "flops_per_s" in r:
                lines.append(f"conv {r['shape']} {r['impl']:>7}: {r['s'] * 1e3:7.2f} ms {r['flops_per_s'] / 1e12:6.0f} "
                             f"TFLOP/s" + (f" = {r['flops_per_s'] / mm:.2f} x matmul" if mm else ""))
            else:
                lines.append(f"rmsnorm+silu {r['shape']}: {r['s'] * 1e3:7.2f} ms {r['bytes_per_s'] / 1e12:.2f} TB/s")
    lines.append(f"{'what':<18}{'impl':>8}{'views':>6}{'chunk':>7}{'s':>8}{'frames/s':>10}{'peak GiB':>10}"
                 f"{'TFLOP/s':>9}{'x matmul':>9}{'x diffusers':>12}")
    for r in records:
        if not r["part"].startswith(("jax-", "diffusers-")):
            continue
        which = r["part"].split("-")[1]
        base = next((b for b in records if b["part"] == f"diffusers-{which}" and b["views"] == r["views"]), None)
        chunk = r.get("encode_chunk" if which == "encode" else "decode_chunk", "")
        vs = f"{r['frames_per_s'] / base['frames_per_s']:.2f}" if base else "-"
        ratio = f"{r['flops_per_s'] / mm:.2f}" if mm else "-"
        lines.append(f"{r['part']:<18}{r.get('impl', 'torch'):>8}{r['views']:>6}{chunk!s:>7}{r['s']:8.3f}"
                     f"{r['frames_per_s']:10.1f}{(r['peak_bytes'] or 0) / gib:10.2f}{r['flops_per_s'] / 1e12:9.0f}"
                     f"{ratio:>9}{vs:>12}")
    return "\n".join(lines)


def main(argv=None) -> None:
    global FRAMES, HEIGHT, WIDTH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(ALL_PARTS))
    ap.add_argument("--impl", default="fold2d", help="comma list of WanVAEConfig.conv_impl for the jax parts")
    ap.add_argument("--views", default="1", help="comma list of video counts")
    ap.add_argument("--encode-chunk", type=int, default=4)
    ap.add_argument("--decode-chunk", type=int, default=1)
    ap.add_argument("--batch-chunk", type=int, default=0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--size", default="29x720x1280", help="TxHxW of each video (smoke tests: 5x64x64)")
    ap.add_argument("--out", default=None, help="append JSON records here")
    ap.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    FRAMES, HEIGHT, WIDTH = (int(v) for v in args.size.split("x"))
    if args.run_part:
        args.views = int(args.views)
        return run_part(args)

    records = []
    for part in args.parts.split(","):
        impls = args.impl.split(",") if part.startswith("jax-") else [args.impl.split(",")[0]]
        views = args.views.split(",") if part.startswith(("jax-", "diffusers-")) else ["1"]
        for impl in impls:
            for v in views:
                argv = ["--run-part", part, "--impl", impl, "--views", v, "--encode-chunk", str(args.encode_chunk),
                        "--decode-chunk", str(args.decode_chunk), "--batch-chunk", str(args.batch_chunk),
                        "--iters", str(args.iters), "--size", args.size]
                records += run_isolated(os.path.abspath(__file__), argv, f"{part} impl={impl} views={v}", args.out)
    print(summarize(records))


if __name__ == "__main__":
    main()
