"""Input pipeline throughput: raw 720p videos (decode + resize + assemble, Grain workers) and the cache path.

    python bench/bench_data.py --make 2                 # renders a 720p synthetic dataset first (~1 min a sample)
    python bench/bench_data.py --dataset DIR --workers 0,2,8

Prints samples/s per configuration, and the time one training step (batch 1 per process) waits for its input when
the loader cannot keep up with a step of --step-s seconds (the reference's 7-view 720p step is ~8.9 s on 8 H100s).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def _rate(it, n: int, buffered: int = 0) -> float:
    """Steady-state batches/s: the first `buffered` + 1 batches (worker start, batches decoded ahead into the
    buffers while the first one was awaited) are drawn but not timed."""
    for _ in range(buffered + 1):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def _row(text: str) -> None:
    print(text, flush=True)


def _sample_gib(views: int = 7, frames: int = 29, h: int = 720, w: int = 1280) -> float:
    return 2 * views * frames * h * w * 3 / 2 ** 30  # video + control, uint8


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="")
    ap.add_argument("--make", type=int, default=0, help="render this many 720p samples into --dataset first")
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--read-threads", type=int, default=4, help="reader threads when there are no workers")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per configuration")
    ap.add_argument("--step-s", type=float, default=8.9)
    args = ap.parse_args(argv)

    from cosmos_jax.data import cache as cache_lib
    from cosmos_jax.data import layout, pipeline
    from tools import make_sample_dataset

    root = args.dataset or os.path.join(tempfile.gettempdir(), "cosmos_jax_bench720")
    if args.make:
        make_sample_dataset.make_dataset(root, samples=args.make, frames=29, height=720, width=1280, crf=23)
    spec = layout.SampleSpec()
    source = pipeline.make_source(root, spec)
    _row(f"{os.cpu_count()} CPU cores; dataset {root} ({len(source)} samples, 7 views + 7 controls x 29 x 720p, "
         f"{_sample_gib():.2f} GiB a decoded sample)")
    for w in (int(x) for x in args.workers.split(",")):
        # in-process: `read_threads` samples decoded at once; with workers: one reader thread and one buffered
        # batch per worker (every buffered 720p sample holds ~1 GiB of frames)
        threads = args.read_threads if w == 0 else 1
        cfg = pipeline.LoaderConfig(batch_size=1, num_workers=w, read_threads=threads, prefetch=1 if w else 2)
        it = iter(pipeline.make_dataset(source, cfg))
        r = _rate(it, args.batches, buffered=w * (cfg.prefetch + cfg.read_threads) + cfg.read_threads + cfg.prefetch)
        wait = max(0.0, 1.0 / r - args.step_s)
        _row(f"raw videos, {w} workers x {threads} reader threads: {r:.3f} samples/s ({1 / r:.2f} s/sample); "
             f"a {args.step_s} s step waits {wait:.2f} s for input")
        del it
    # cache path: entries of the real shapes (latents of 7 views + 7 controls, projected contexts)
    with tempfile.TemporaryDirectory() as d:
        cache = cache_lib.Cache(d, {"bench": True}, create=True)
        rng = np.random.default_rng(0)
        names = [f"s{i}" for i in range(4)]
        for n in names:
            cache.write(n, {"latent": rng.standard_normal((7, 8, 90, 160, 16), np.float32),
                            "latent_control": rng.standard_normal((7, 8, 90, 160, 16), np.float32),
                            "context": rng.standard_normal((7 * 512, 1024), np.float32),
                            "view_indices_selection": np.arange(7), "fps": np.float32(10)})
        it = iter(pipeline.make_dataset(cache_lib.CachedSource(cache, names), pipeline.LoaderConfig(batch_size=1)))
        r = _rate(it, 8)
        _row(f"cache: {r:.1f} samples/s ({1e3 / r:.1f} ms/sample, "
             f"{os.path.getsize(cache.path(names[0])) / 2 ** 20:.0f} MiB/sample)")


if __name__ == "__main__":
    main()
