"""Timing helpers shared by the benchmarks: a median wall-clock timer and the in-run bf16 matmul baseline."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def timeit(fn, *args, warmup=1, iters=3):
    """Median seconds of `fn(*args)` (blocked until ready) after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_steps(step, state, batch, iters: int):
    """Run a compiled train step `iters` times, each timed to completion: (state, last metrics, sorted seconds)."""
    times, metrics = [], None
    for _ in range(iters):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return state, metrics, sorted(times)


def matmul_rate(n=8192, chain=16):
    """bf16 FLOP/s of `chain` dependent n^3 matmuls in one jit call (no per-call dispatch in the timing)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16) / jnp.sqrt(n).astype(jnp.bfloat16)
    f = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda i, x: x @ b, a))
    t = timeit(f, a, b, warmup=2, iters=5)
    return chain * 2 * n ** 3 / t


def batched_matmul_rate(n=8192, batch=8, chain=4):
    """bf16 FLOP/s of `batch` independent n^3 GEMMs in one batched call, `chain` such calls per jit call."""
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (batch, n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (batch, n, n), jnp.bfloat16) / jnp.sqrt(n).astype(jnp.bfloat16)
    f = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda i, x: jnp.einsum("bij,bjk->bik", x, b), a))
    t = timeit(f, a, b, warmup=2, iters=5)
    return chain * batch * 2 * n ** 3 / t


def best_matmul_rate() -> float:
    """The in-run baseline every benchmark divides by: the best of 8192^3 x16 and 16384^3 x4 bf16 chains and
    8 independent 8192^3 GEMMs in one batched call (the fastest form on an H200, ~746 TFLOP/s)."""
    return max(matmul_rate(8192, 16), matmul_rate(16384, 4), batched_matmul_rate())


def emit_matmul_baseline() -> None:
    """The child process that measures the in-run baseline (best_matmul_rate) and emits it with the device; on a
    CPU (smoke runs of a bench) a small 1024^3 chain instead, which would otherwise take hours."""
    rate = matmul_rate(1024, 4) if jax.default_backend() == "cpu" else best_matmul_rate()
    emit({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "matmul_tflops": rate / 1e12})


def emit(record: dict) -> None:
    """One measurement, as a line the parent process collects (see run_isolated)."""
    import json

    print("RESULT " + json.dumps(record), flush=True)


def run_isolated(script: str, argv: list[str], label: str, out: str | None = None) -> list[dict]:
    """Run `python script argv` in a fresh process (its own peak memory); return the records it emitted."""
    import json
    import subprocess
    import sys

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script] + argv, capture_output=True, text=True)
    got = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    print(f"[{label}] rc={proc.returncode} {time.perf_counter() - t0:.0f}s", flush=True)
    if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
    if out:
        with open(out, "a") as f:
            for r in got:
                f.write(json.dumps(r) + "\n")
    return got
