"""Text encoder (Qwen2.5-VL-7B-shaped language model, random weights, bf16) on one GPU, against transformers.

    python bench/bench_text.py                                  # matmul, jax, transformers at batch 1 and 8
    python bench/bench_text.py --parts jax --batch 1 --backend cudnn,xla --out /tmp/text.jsonl

Parts (each in its own process, so each peak memory is its own, weights included):
  matmul         8192^3 bf16 matmul rate: the baseline for "achieved TFLOP/s / matmul rate"
  jax            text.embed.embed_ids: 512 token ids -> every hidden state -> the recipe's normalised
                 concatenation (B, 512, 100352); also the bare forward (hidden states only) as `jax-hidden`
  transformers   transformers' Qwen2_5_VLTextModel (same shape, bf16, sdpa, torch.inference_mode) with
                 output_hidden_states=True: what the reference-side code computes per caption batch

FLOPs per caption: 2 x 512 x (matmul parameters of the 28 layers) + causal attention 2 x 512^2 x 3584 per layer
(the embedding gather and the normalisation are not counted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import emit, run_isolated  # noqa: E402

SEQ = 512
ALL_PARTS = ("matmul", "jax", "transformers")


def caption_flops(cfg) -> float:
    d, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    matmul_params = L * (d * (q + 2 * kv) + q * d + 3 * d * i)
    return 2.0 * SEQ * matmul_params + L * 2.0 * SEQ * SEQ * q


def model_config(args, **kw):
    import jax.numpy as jnp

    from cosmos_jax.models import text_encoder as te

    if args.config == "tiny":  # CPU smoke runs of this script
        return te.QwenTextConfig.tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **kw)
    return te.QwenTextConfig(**kw)


def part_jax(args) -> None:
    import jax
    import jax.numpy as jnp

    from bench.common import timeit
    from cosmos_jax.models import text_encoder as te
    from cosmos_jax.text import embed as text_embed

    cfg = model_config(args, attention_backend=args.backend, scan_layers=not args.unrolled)
    params = text_embed.init_params(cfg)
    ids = jax.random.randint(jax.random.key(0), (args.batch, SEQ), 0, cfg.vocab_size, jnp.int32)
    hidden = jax.jit(lambda p, i: te.QwenTextModel(cfg).apply({"params": p}, i))
    fl = caption_flops(cfg) * args.batch
    for name, fn in (("jax", lambda p, i: text_embed.embed_ids(cfg, p, i)), ("jax-hidden", hidden)):
        s = timeit(fn, params, ids, warmup=2, iters=args.iters)
        stats = jax.local_devices()[0].memory_stats() or {}
        emit({"part": name + ("-unrolled" if args.unrolled else ""), "backend": args.backend, "batch": args.batch, "s": s, "captions_per_s": args.batch / s,
              "flops_per_s": fl / s, "peak_bytes": stats.get("peak_bytes_in_use")})


def part_transformers(args) -> None:
    import torch
    import transformers
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    cfg = model_config(args)
    half = cfg.head_dim // 2
    text_cfg = Qwen2_5_VLConfig(text_config=dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling={"type": "mrope", "mrope_section": [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]}),
    ).text_config
    text_cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2_5_VLTextModel(text_cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, SEQ), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for it in range(args.iters + 5):
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=ids, output_hidden_states=True)
            assert len(out.hidden_states) == cfg.num_hidden_layers + 1
            sync()
            if it >= 5:
                times.append(time.perf_counter() - t0)
    s = sorted(times)[len(times) // 2]
    emit({"part": "transformers", "batch": args.batch, "s": s, "captions_per_s": args.batch / s,
          "flops_per_s": caption_flops(cfg) * args.batch / s, "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
          "torch": torch.__version__, "transformers": transformers.__version__})


def summarize(records: list[dict]) -> str:
    mm = next((r["flops_per_s"] for r in records if r["part"] == "matmul"), None)
    lines = [f"matmul baseline: {mm / 1e12:.0f} TFLOP/s" if mm else "matmul baseline: not run",
             f"{'what':<14}{'attn':>7}{'batch':>6}{'ms':>9}{'captions/s':>12}{'peak GiB':>10}{'TFLOP/s':>9}"
             f"{'x matmul':>9}{'x transformers':>16}"]
    for r in records:
        if r["part"] == "matmul":
            continue
        base = next((b for b in records if b["part"] == "transformers" and b["batch"] == r["batch"]), None)
        vs = f"{r['captions_per_s'] / base['captions_per_s']:.2f}" if base else "-"
        ratio = f"{r['flops_per_s'] / mm:.2f}" if mm else "-"
        lines.append(f"{r['part']:<14}{r.get('backend', 'sdpa'):>7}{r['batch']:>6}{r['s'] * 1e3:9.2f}"
                     f"{r['captions_per_s']:12.1f}{(r['peak_bytes'] or 0) / 2 ** 30:10.2f}"
                     f"{r['flops_per_s'] / 1e12:9.0f}{ratio:>9}{vs:>16}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(ALL_PARTS))
    ap.add_argument("--batch", default="1,8", help="comma list of caption batch sizes")
    ap.add_argument("--backend", default="cudnn", help="comma list of QwenTextConfig.attention_backend")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--unrolled", default="1", help="comma list of 0/1: QwenTextConfig.scan_layers=False")
    ap.add_argument("--config", default="7b", choices=("7b", "tiny"), help="model shape (tiny: CPU smoke runs)")
    ap.add_argument("--out", default=None, help="append JSON records here")
    ap.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_part:
        args.batch = int(args.batch)
        args.unrolled = bool(int(args.unrolled))
        if args.run_part == "matmul":
            from bench.common import best_matmul_rate

            return emit({"part": "matmul", "flops_per_s": best_matmul_rate()})
        return {"jax": part_jax, "transformers": part_transformers}[args.run_part](args)
    records = []
    for part in args.parts.split(","):
        variants = [(b, u) for b in args.backend.split(",") for u in args.unrolled.split(",")] if part == "jax" \
            else [("-", "0")]
        batches = args.batch.split(",") if part != "matmul" else ["1"]
        for backend, unrolled in variants:
            for b in batches:
                argv = ["--run-part", part, "--batch", b, "--backend", backend, "--unrolled", unrolled,
                        "--iters", str(args.iters), "--config", args.config]
                records += run_isolated(os.path.abspath(__file__), argv, f"{part} {backend} u={unrolled} batch={b}",
                                        args.out)
    print(summarize(records))


if __name__ == "__main__":
    main()
