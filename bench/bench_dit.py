"""Forward+backward of the full 2B multiview control DiT on one GPU: step time, peak memory, MFU.

    python bench/bench_dit.py --views 1 --remat none,save_attention      # (a) 1 view x 8 x 90x160
    python bench/bench_dit.py --views 7 --remat full                     # (b) 7 views

Every number is printed as a ratio against baselines timed in the same process:
  * a large bf16 matmul (8192^3)                  -> MFU = model FLOP/s / matmul FLOP/s
  * the same cuDNN attention call alone           -> attention-in-net efficiency
Attention time inside the net is measured by difference: the net step minus the same step with self-attention
replaced by a no-op (METHOD.md: time variants that leave one stage out).

FLOP convention (issue #3): attention 4*S^2*D per layer forward and 2.5x that backward; linear layers 2 FLOP per
MAC, x3 for forward+backward. Recomputation from remat is not counted (model FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from cosmos_jax.models import dit as dit_lib  # noqa: E402
from cosmos_jax.models.dit_config import DiTConfig  # noqa: E402
from cosmos_jax.ops import attention as attn_ops  # noqa: E402
from bench.common import best_matmul_rate, timeit  # noqa: E402


def attention_alone(L, heads, head_dim, backend="cudnn"):
    """fwd+bwd seconds of one attention call of the net's self-attention shape on `backend`."""
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(kk, (1, L, heads, head_dim), jnp.bfloat16) for kk in ks)

    def fb(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: attn_ops.local_attention(q, k, v, backend=backend), q, k, v)
        return vjp(do)

    return timeit(jax.jit(fb), q, k, v, do, warmup=2, iters=5)


def model_flops(cfg: DiTConfig, n_views: int, t: int, h: int, w: int) -> dict:
    d = cfg.model_channels
    s = n_views * t * (h // cfg.patch_spatial) * (w // cfg.patch_spatial)  # tokens
    m = n_views * cfg.crossattn_tokens_per_view
    dc = cfg.crossattn_emb_channels
    n_layers = cfg.num_blocks + cfg.num_control_blocks
    attn_fwd = n_layers * (4 * s * s * d + 4 * s * cfg.crossattn_tokens_per_view * d)  # self + per-view cross
    macs_block = s * (4 * d * d + 2 * d * d + 2 * d * cfg.mlp_hidden) + m * 2 * dc * d
    macs = n_layers * macs_block + cfg.num_control_blocks * s * d * d  # after_proj
    macs += s * (cfg.x_in_channels * 4 + cfg.control_in_channels * 4) * d  # patch embedders
    macs += s * (cfg.hint_layers + 1) * d * d + s * d * cfg.patch_dim_out  # hint MLP, before_proj, final
    macs += m * cfg.crossattn_proj_in_channels * dc
    return {"tokens": s, "attention": attn_fwd * 3.5, "linear": 2 * macs * 3, "total": attn_fwd * 3.5 + 6 * macs}


def net_step(cfg, n_views, t, h, w):
    """jit'd fwd+bwd (grads of all parameters) of the net on random inputs; returns (fn, args)."""
    inputs = dit_lib.random_inputs(cfg, jax.random.key(2), n_views=n_views, height=h, width=w, dtype=jnp.bfloat16)
    model = dit_lib.MultiViewControlDiT(cfg)
    params = jax.jit(lambda: nn.unbox(dit_lib.init_boxed_params(cfg, jax.random.key(0))))()

    def loss(params, inputs):
        out = model.apply({"params": params}, **inputs)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    return (jax.jit(jax.value_and_grad(loss), compiler_options=attn_ops.compiler_options(cfg.attention_backend)),
            (params, inputs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", default="1")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--height", type=int, default=90)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--remat", default="none", help="comma list of remat policies")
    ap.add_argument("--attention", default="cudnn", help="comma list of attention backends (cudnn, fa3)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-diff", action="store_true", help="skip the attention-removed variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    # baseline: the faster of two large bf16 matmul sizes (the conservative choice for MFU)
    mm = best_matmul_rate()
    print(f"bf16 matmul (best of 16 x 8192^3, 4 x 16384^3 in one jit): {mm / 1e12:.1f} TFLOP/s", flush=True)
    results = {"device": dev.device_kind, "jax": jax.__version__, "matmul_tflops": mm / 1e12, "runs": []}

    for n_views in [int(v) for v in args.views.split(",")]:
        for policy, backend in [(p, b) for p in args.remat.split(",") for b in args.attention.split(",")]:
            cfg = DiTConfig.real_2b(attention_backend=backend, remat_policy=policy, state_t=args.frames)
            fl = model_flops(cfg, n_views, args.frames, args.height, args.width)
            L = fl["tokens"]
            row = {"views": n_views, "remat": policy, "attention": backend, "tokens": L}
            try:
                fn, fargs = net_step(cfg, n_views, args.frames, args.height, args.width)
                t0 = time.perf_counter()
                fn = fn.lower(*fargs).compile()
                row["compile_s"] = time.perf_counter() - t0
                mem = fn.memory_analysis()
                row["compiled_gib"] = {k: getattr(mem, f"{k}_size_in_bytes") / 2 ** 30
                                       for k in ("argument", "output", "temp")}
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*fargs))
                row["first_step_s"] = time.perf_counter() - t0
                step = timeit(fn, *fargs, warmup=0, iters=args.iters)
                row["step_s"] = step
                row["peak_gib"] = sum(row["compiled_gib"].values())  # args + outputs + XLA temp of this executable
                row["mfu_vs_matmul"] = fl["total"] / step / mm
                row["model_tflops"] = fl["total"] / step / 1e12
                row["attention_flop_share"] = fl["attention"] / fl["total"]
                del fn, fargs
                if not args.no_diff:
                    real_attn = attn_ops.self_attention
                    # leave the attention kernel out but keep q, k, v (and their projections) alive
                    attn_ops.self_attention = lambda q, k, v, **kw: q + k + v
                    try:
                        fn, fargs = net_step(cfg, n_views, args.frames, args.height, args.width)
                        step_noattn = timeit(fn, *fargs, warmup=1, iters=args.iters)
                    finally:
                        attn_ops.self_attention = real_attn
                    del fn, fargs
                    alone = attention_alone(L, cfg.num_heads, cfg.head_dim, backend)
                    n_layers = cfg.num_blocks + cfg.num_control_blocks
                    in_net = (step - step_noattn) / n_layers
                    row.update(step_without_self_attention_s=step_noattn, attention_alone_s=alone,
                               attention_in_net_s=in_net, attention_alone_over_in_net=alone / in_net,
                               attention_alone_tflops=3.5 * 4 * L * L * cfg.model_channels / alone / 1e12)
            except Exception as e:  # report OOM etc. and carry on with the next configuration
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            jax.clear_caches()

    with open(os.path.join(args.out, "bench_dit.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'views':>5} {'remat':>24} {'attn':>5} {'tokens':>7} {'step s':>8} {'peak GiB':>8} {'MFU/mm':>7} "
          f"{'attn alone/in-net':>17}")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['views']:>5} {r['remat']:>24} {r['attention']:>5} {r['tokens']:>7} {r['error'][:60]}")
            continue
        print(f"{r['views']:>5} {r['remat']:>24} {r['attention']:>5} {r['tokens']:>7} {r['step_s']:>8.3f} "
              f"{r['peak_gib']:>8.1f} {r['mfu_vs_matmul']:>7.3f} "
              f"{r.get('attention_alone_over_in_net', float('nan')):>17.3f}")


if __name__ == "__main__":
    main()
