"""Does fp8 attention train like bf16? The trainer's step on the real 2B config (1 view, reduced resolution), the same
weights, data and seeds, for N steps with each attention backend; a second bf16 seed gives the run-to-run noise.

    python bench/fp8_loss_curve.py                       # fa3 seed 0, fp8 seed 0, fa3 seed 1; 300 steps
    python bench/fp8_loss_curve.py --steps 50 --variant tiny --runs xla:0,xla:1   # CPU smoke run
    python bench/fp8_loss_curve.py --compare a.jsonl,b.jsonl   # the table from runs saved by separate invocations

Data: a fixed pool of 8 synthetic samples, cycled in the same order in every run: smooth latents (noise at 1/4
resolution, upsampled) and control latents that are a fixed function of them (so the control branch has something
to learn). Optimiser as post_train_example but with a 20-step warm-up (its 1,000-step warm-up would leave the
learning rate near zero for the whole comparison). Per run: the loss of every step; printed: means over windows of
25 steps, and the largest window difference of each run from the first (the baseline), next to the largest
difference between the two seeds of the baseline backend (run-to-run noise). Each run is its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

WINDOW = 25


def synthetic_pool(n: int, like: dict) -> list:
    """n batches shaped like `like` (setup()'s batch): smooth latents (noise at 1/4 resolution, upsampled), control
    latents a fixed function of them, random contexts; the same numbers in every run."""
    import numpy as np

    rng = np.random.default_rng(1234)
    b, c, t, h, w = like["x0"].shape
    pool = []
    for _ in range(n):
        low = rng.standard_normal((b, c, t, -(-h // 4), -(-w // 4))).astype(np.float32)
        x0 = np.repeat(np.repeat(low, 4, axis=3), 4, axis=4)[..., :h, :w]
        control = np.tanh(2.0 * x0[:, ::-1]) + 0.1 * rng.standard_normal(x0.shape).astype(np.float32)
        pool.append({"x0": x0, "latent_control": control.astype(np.float32),
                     "context": rng.standard_normal(like["context"].shape).astype(np.float32),
                     "view_indices": np.asarray(like["view_indices"])})
    return pool


def child(args) -> None:
    import jax
    import jax.numpy as jnp

    from bench.bench_train import setup
    from bench.common import emit

    backend, seed = args.run.split(":")

    def overrides(config):
        config.scheduler.warm_up_steps = 20
        config.optimizer.lr = args.lr
        if args.variant == "tiny":  # CPU smoke run: the caseA-size net
            from configs import transfer2_auto_multiview as cfg_file

            config.model = cfg_file.get_config("tiny").model
            config.model.attention_backend = backend
            config.model.remat_policy = "save_attention"

    step_fn, state, like, _, row = setup(args.views, "save_attention", backend, args.height, args.width,
                                         seed=int(seed), overrides=overrides)
    row.update(run=args.run, seed=int(seed), steps=args.steps, lr=args.lr)
    try:
        pool = [jax.tree.map(jnp.asarray, b) for b in synthetic_pool(8, like)]
        losses, t0 = [], time.perf_counter()
        for i in range(args.steps):
            state, m = step_fn(state, pool[i % len(pool)])
            losses.append(float(m["loss"]))
            if i == 0:
                row["first_step_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
            if (i + 1) % 50 == 0:
                print(f"[child] {args.run}: step {i + 1} loss {sum(losses[-50:]) / 50:.4f}", flush=True)
        row["step_s"] = (time.perf_counter() - t0) / max(args.steps - 1, 1)
        row["losses"] = losses
        row["nonfinite_steps"] = int(state["trainer"]["nonfinite_steps"])
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    emit(row)


def windows(losses, size=WINDOW):
    return [sum(losses[i:i + size]) / len(losses[i:i + size]) for i in range(0, len(losses), size)]


def compare(rows):
    """{run: (window means, max |window diff| to the first run)} and the baseline's seed-to-seed noise."""
    ok = [r for r in rows if "losses" in r]
    if not ok:
        return {}, None
    base = ok[0]
    wb = windows(base["losses"])
    out, names = {}, [r["run"] for r in ok]
    for i, r in enumerate(ok):
        w = windows(r["losses"])
        key = r["run"] if names.count(r["run"]) == 1 else f"{r['run']}#{i}"
        out[key] = (w, max(abs(a - b) for a, b in zip(w, wb)))
    backend0 = base["run"].split(":")[0]
    same = [key for key, r in zip(out, ok) if r is not base and r["run"].split(":")[0] == backend0
            and r["run"] != base["run"]]
    noise = out[same[0]][1] if same else None
    return out, noise


def parent(args) -> None:
    from bench.common import run_isolated

    rows = []
    if args.compare:  # rows saved by earlier invocations (e.g. one device call per run)
        for path in args.compare.split(","):
            with open(path) as f:
                rows += [r for r in map(json.loads, filter(str.strip, f)) if "run" in r]
        report(rows)
        return
    out = os.path.join(args.out, "fp8_loss_curve.jsonl")
    for run in args.runs.split(","):
        argv = ["--child", "--run", run, "--steps", str(args.steps), "--views", str(args.views),
                "--height", str(args.height), "--width", str(args.width), "--lr", str(args.lr),
                "--variant", args.variant]
        for r in run_isolated(__file__, argv, run, out):
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    report(rows)


def report(rows) -> None:
    table, noise = compare(rows)
    if not table:
        return
    steps = len(next(r for r in rows if "losses" in r)["losses"])  # the baseline's
    runs = list(table)
    print(f"\nmean loss per {WINDOW}-step window")
    print(f"{'steps':>9} " + " ".join(f"{r:>10}" for r in runs))
    for i in range(len(table[runs[0]][0])):
        print(f"{i * WINDOW:>4}-{min((i + 1) * WINDOW, steps) - 1:<4} " +
              " ".join(f"{table[r][0][i]:>10.4f}" for r in runs))
    print(f"\nlargest window difference from {runs[0]}: " +
          ", ".join(f"{r} {table[r][1]:.4f}" for r in runs[1:]) +
          (f"; run-to-run noise (same backend, other seed) {noise:.4f}" if noise is not None else ""))
    for r in rows:
        if "step_s" in r:
            print(f"{r['run']}: {r['step_s']:.3f} s/step, non-finite steps {r['nonfinite_steps']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="fa3:0,fp8:0,fa3:1", help="comma list of backend:seed; the first is the "
                    "baseline, a second seed of its backend measures run-to-run noise")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--height", type=int, default=32, help="latent height (720p: 90)")
    ap.add_argument("--width", type=int, default=64, help="latent width (720p: 160)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--variant", default="post_train_example", help="tiny: a CPU smoke run")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--compare", default="", help="comma list of fp8_loss_curve.jsonl files: print the comparison "
                    "of the runs saved there (in file order; the first is the baseline) instead of running")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
