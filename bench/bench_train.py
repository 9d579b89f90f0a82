"""The full post-training step on one GPU: real 2B config, synthetic latents, step time, peak memory, MFU.

    python bench/bench_train.py --views 1,2 --remat save_attention      # parent: matmul baseline + one child per row
    python bench/bench_train.py --views 7 --remat save_self_attention,full

The step is exactly the trainer's (cosmos_jax.training.step): loss with conditioning frames and text dropout,
gradients of the control branch only, non-finite zeroing + clipping, AdamW on fp32 master weights, power EMA, the
frozen base held in bf16; inputs are random latents (16 x V*8 x 90 x 160), a random projected text context
(V*512 x 1024) and view ids. Every row is printed as a ratio against the best bf16 matmul rate measured in the same
run (the better of chained single 8192^3 / 16384^3 GEMMs and 8 independent 8192^3 GEMMs in one batched call), and
against 785 TFLOP/s. FLOPs are model FLOPs (cosmos_jax/training/flops.py: no remat recomputation, no frozen weight
gradients). Each row runs in its own process so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NOMINAL = 785e12


def setup(views: int, remat: str, attention: str, height: int = 90, width: int = 160, fix: bool = True,
          seed: int = 0, overrides=None):
    """The trainer's jitted step on the real 2B config, its state and one synthetic batch:
    (step_fn, state, batch, model FLOPs per step, row with the shape fields). `fix=False` compiles without the
    backend's compiler options (ops.attention.compiler_options), to measure what they buy. `seed`: the state's
    rng seed (noise, timesteps, dropout; the weights always come from key 0); `overrides(config)` edits the config
    before anything is built."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from configs import transfer2_auto_multiview as cfg_file
    from cosmos_jax import build
    from cosmos_jax.models import dit as dit_lib
    from cosmos_jax.ops import attention as attn_ops
    from cosmos_jax.training import flops as flops_lib
    from cosmos_jax.training import step as step_lib

    config = cfg_file.get_config("post_train_example")
    config.unlock()
    config.model.remat_policy = remat
    config.model.attention_backend = attention
    if overrides is not None:
        overrides(config)
    cfg = build.dit_config_from(config.model)
    step_cfg = step_lib.step_config_from(config)
    optimizer = step_lib.optimizer_from(config)
    v, t, h, w = int(views), cfg.state_t, height, width
    row = {"views": v, "remat": remat, "attention": attention, "tokens": v * t * (h // 2) * (w // 2)}
    flops = flops_lib.train_step_flops(cfg, v, t, h, w)
    row["model_tflop_per_step"] = flops / 1e12

    ks = jax.random.split(jax.random.key(1), 4)
    batch = {"x0": jax.random.normal(ks[0], (1, 16, v * t, h, w), jnp.float32),
             "latent_control": jax.random.normal(ks[1], (1, 16, v * t, h, w), jnp.float32),
             "context": jax.random.normal(ks[2], (1, v * 512, cfg.crossattn_emb_channels), jnp.float32),
             "view_indices": jnp.repeat(jnp.arange(v, dtype=jnp.int32), t)[None]}
    print(f"[child] building state ({v} views, {remat}, {attention})", flush=True)
    state = jax.jit(lambda: step_lib.init_state(nn.unbox(dit_lib.init_boxed_params(cfg, jax.random.key(0))), cfg,
                                                step_cfg, optimizer, seed))()
    step_fn = jax.jit(step_lib.make_train_step(cfg, step_cfg, optimizer), donate_argnums=0,
                      compiler_options=attn_ops.compiler_options(cfg.attention_backend) if fix else None)
    return step_fn, state, batch, flops, row


def child(args) -> None:
    import jax

    from bench.common import emit, time_steps

    backend, _, flag = args.attention.partition("+")  # "fa3+nofix": without the backend's compiler options
    step_fn, state, batch, flops, row = setup(args.views, args.remat, backend, args.height, args.width,
                                              fix=flag != "nofix")
    row["attention"] = args.attention
    try:
        t0 = time.perf_counter()
        lowered = step_fn.lower(state, batch)
        print(f"[child] lowered in {time.perf_counter() - t0:.1f}s; compiling", flush=True)
        compiled = lowered.compile()
        row["compile_s"] = time.perf_counter() - t0
        print(f"[child] compiled in {row['compile_s']:.1f}s", flush=True)
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        row["first_step_s"] = time.perf_counter() - t0
        row["first_loss"] = float(m["loss"])
        state, m, times = time_steps(compiled, state, batch, args.iters)
        row["step_s"] = times[len(times) // 2]
        row["step_times_s"] = times
        row["loss"] = float(m["loss"])
        stats = jax.devices()[0].memory_stats() or {}
        row["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30
        row["model_tflops"] = flops / row["step_s"] / 1e12
    except Exception as e:  # OOM etc.: report and let the parent go on
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    emit(row)


def parent(args) -> None:
    from bench.common import run_isolated

    # the parent never touches the GPU: a JAX client there would hold most of its memory while the children run
    out = os.path.join(args.out, "bench_train.jsonl")
    base = run_isolated(__file__, ["--matmul"], "matmul", out)[0]
    mm = base["matmul_tflops"] * 1e12
    print(f"device: {base['device']}, jax {base['jax']}; best bf16 matmul in this run {mm / 1e12:.1f} TFLOP/s "
          f"({mm / NOMINAL:.3f} of 785)", flush=True)
    rows = []
    plan = ([(int(v), r) for v, r in (x.split(":") for x in args.rows.split(","))] if args.rows else
            [(int(v), r) for v in args.views.split(",") for r in args.remat.split(",")])
    for (v, remat), backend in [(p, b) for p in plan for b in args.attention.split(",")]:
        argv = ["--child", "--views", str(v), "--remat", remat, "--attention", backend,
                "--iters", str(args.iters), "--height", str(args.height), "--width", str(args.width)]
        for r in run_isolated(__file__, argv, f"{v} views {remat} {backend}", out):
            if "step_s" in r:
                r["mfu_vs_matmul"] = r["model_tflops"] * 1e12 / mm
                r["mfu_vs_785"] = r["model_tflops"] * 1e12 / NOMINAL
            rows.append(r)
            print(json.dumps(r), flush=True)
    first = {}
    for r in rows:  # the first backend of each (views, remat) row is the baseline of the others
        if "step_s" in r:
            first.setdefault((r["views"], r["remat"]), r["step_s"])
    print(f"\n{'views':>5} {'remat':>22} {'attn':>9} {'tokens':>7} {'compile s':>9} {'step s':>8} {'peak GiB':>8} "
          f"{'TFLOP/s':>8} {'x matmul':>8} {'x 785':>6} {'x first':>7}")
    for r in rows:
        if "step_s" not in r:
            print(f"{r['views']:>5} {r['remat']:>22} {r['attention']:>9} {r['tokens']:>7} {r.get('error', '?')[:70]}")
            continue
        print(f"{r['views']:>5} {r['remat']:>22} {r['attention']:>9} {r['tokens']:>7} {r['compile_s']:>9.1f} "
              f"{r['step_s']:>8.2f} {r['peak_gib']:>8.1f} {r['model_tflops']:>8.1f} {r['mfu_vs_matmul']:>8.3f} "
              f"{r['mfu_vs_785']:>6.3f} {first[(r['views'], r['remat'])] / r['step_s']:>7.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", default="1,2", help="comma list of view counts (720p, 8 latent frames each)")
    ap.add_argument("--remat", default="save_attention", help="comma list of remat policies")
    ap.add_argument("--rows", default="", help="views:remat pairs instead of the product, e.g. 1:save_attention,7:full")
    ap.add_argument("--attention", default="cudnn", help="comma list of attention backends (the first is the "
                    "baseline of the 'x first' column); 'fa3+nofix' compiles without ops.attention.compiler_options")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--height", type=int, default=90, help="latent height (720p -> 90)")
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.matmul:
        from bench.common import emit_matmul_baseline

        emit_matmul_baseline()
    else:
        (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
