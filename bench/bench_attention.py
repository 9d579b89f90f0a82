"""Attention alone on one GPU: fwd+bwd time of each backend at the DiT's shapes, as a ratio against cuDNN bf16
measured in the same run, and the outputs' / gradients' distance to cuDNN's.

    python bench/bench_attention.py                        # cudnn vs fa3 at 28,800x16 / 57,600x16 / 201,600x2 / 25,200x16
    python bench/bench_attention.py --shapes 28800x16 --backends cudnn,fa3

Shapes are S x H of q, k, v [1, S, H, 128] bf16 (S x 16 heads: 1 / 2 views on one GPU; 201,600 x 2: 7 views on
8 GPUs under Ulysses; 25,200 x 16: 7 views x 8 frames x 450 tokens at 480p). FLOPs: forward 4*S^2*H*D, backward
2.5x forward (the FlashAttention convention). The op timed is cosmos_jax.ops.attention.local_attention, i.e. what the
net runs (cuDNN: padded to a multiple of 64 with sequence lengths; fa3: our custom_vjp around the wheel's kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="28800x16,57600x16,201600x2,25200x16", help="comma list of SxH")
    ap.add_argument("--backends", default="cudnn,fa3", help="comma list; the first is the baseline")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_attention.jsonl")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.common import timeit
    from cosmos_jax.ops import attention as attn

    backends = args.backends.split(",")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        s, h = (int(x) for x in shape.split("x"))
        d = 128
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v, ct = (jax.random.normal(kk, (1, s, h, d), jnp.bfloat16) for kk in ks)
        flops = 3.5 * 4 * s * s * h * d
        base = None
        ref = None
        for b in backends:
            def loss(q, k, v, b=b):
                o = attn.local_attention(q, k, v, backend=b)
                return jnp.sum(o.astype(jnp.float32) * ct.astype(jnp.float32)), o

            f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            row = {"S": s, "H": h, "backend": b}
            try:
                (_, out), grads = f(q, k, v)
                row["s"] = timeit(f, q, k, v, warmup=1, iters=args.iters)
                row["tflops"] = flops / row["s"] / 1e12
                res = [np.asarray(x, np.float32) for x in (out, *grads)]
                if ref is None:
                    ref, base = res, row["s"]
                else:
                    row["rel_err_out"] = float(np.linalg.norm(res[0] - ref[0]) / np.linalg.norm(ref[0]))
                    row["rel_err_grad"] = max(float(np.linalg.norm(a - r) / np.linalg.norm(r))
                                              for a, r in zip(res[1:], ref[1:]))
                row["x_baseline"] = base / row["s"]
            except Exception as e:  # noqa: BLE001 (report and go on)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "bench_attention.jsonl"), "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print(f"\n{'S x H':>12} {'backend':>7} {'ms':>8} {'TFLOP/s':>8} {'x ' + backends[0]:>8} {'out err':>8} {'grad err':>8}")
    for r in rows:
        if "s" not in r:
            print(f"{r['S']:>7}x{r['H']:<4} {r['backend']:>7} {r['error'][:80]}")
            continue
        print(f"{r['S']:>7}x{r['H']:<4} {r['backend']:>7} {r['s'] * 1e3:>8.2f} {r['tflops']:>8.1f} "
              f"{r['x_baseline']:>8.3f} {r.get('rel_err_out', 0):>8.1e} {r.get('rel_err_grad', 0):>8.1e}")


if __name__ == "__main__":
    main()
