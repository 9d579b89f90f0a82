"""Which scale of cuDNN's fp8 attention (through JAX's primitives) does what: one scale varied at a time from all-1,
errors of o, dq, dk, dv against an fp32 XLA reference, the kernel's amax outputs and how many fp8 outputs sit at
the e4m3 limit (saturation). One H200 run answers what the bench's delayed-scaling row got wrong.

    python bench/probes/fp8_scales.py [--shape 4096x16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

NAMES = ("q", "k", "v", "s", "o", "do", "dp", "dq", "dk", "dv")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x16")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.bench_fp8 import cudnn_fp8_fn, amax
    from cosmos_jax.ops import attention as attn

    s, h = (int(x) for x in args.shape.split("x"))
    d = 128
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (1, s, h, d), jnp.bfloat16) for kk in ks)

    def ref_loss(q, k, v):
        o = attn.local_attention(q, k, v, backend="xla")
        return jnp.sum(o * ct.astype(jnp.float32)), o
    with jax.default_matmul_precision("highest"):
        (_, o32), g32 = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True))(
            *(x.astype(jnp.float32) for x in (q, k, v)))
    ref = [np.asarray(x, np.float32) for x in (o32, *g32)]
    true_amax = {"o": float(np.abs(ref[0]).max()), "dq": float(np.abs(ref[1]).max()),
                 "dk": float(np.abs(ref[2]).max()), "dv": float(np.abs(ref[3]).max()),
                 "q": float(amax(q)), "k": float(amax(k)), "v": float(amax(v)), "do": float(amax(ct))}
    print("true amax", json.dumps(true_amax), flush=True)
    run = jax.jit(cudnn_fp8_fn(d))

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    variants = [("all 1", {})]
    for x in ("q", "k", "v", "do"):
        variants.append((f"{x} 448/amax", {x: 448 / true_amax[x]}))
    variants.append(("qkv 448/amax", {x: 448 / true_amax[x] for x in ("q", "k", "v")}))
    for val in (4.0, 16.0, 64.0, 256.0, 448.0):
        variants.append((f"s {val:g}", {"s": val}))
    for val in (8.0, 64.0, 448 / true_amax["o"]):
        variants.append((f"o {val:g}", {"o": val}))
    for val in (16.0, 256.0, 4096.0, 65536.0):
        variants.append((f"dp {val:g}", {"dp": val}))
    for x in ("dq", "dk", "dv"):
        variants.append((f"{x} 448/amax", {x: 448 / true_amax[x]}))
    variants.append(("s 256 + dp 4096", {"s": 256.0, "dp": 4096.0}))
    rows = []
    for name, over in variants:
        scales = jnp.asarray([over.get(n, 1.0) for n in NAMES], jnp.float32)
        try:
            o, dq, dk, dv, amaxes = run(q, k, v, ct, scales)
            outs = [np.asarray(x, np.float32) for x in (o, dq, dk, dv)]
            row = {"variant": name, "err": [rel(a, r) for a, r in zip(outs, ref)],
                   "amax_s_o_dq_dk_dv_dp": np.asarray(amaxes).tolist(),
                   "saturated_frac": [float(np.mean(np.abs(a * sc) >= 447.9)) for a, sc in
                                      zip(outs, [over.get(n, 1.0) for n in ("o", "dq", "dk", "dv")])]}
        except Exception as e:  # noqa: BLE001
            row = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "fp8_scales.jsonl"), "a") as fh:
        fh.write(json.dumps({"true_amax": true_amax, "shape": args.shape}) + "\n")
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print(f"\n{'variant':>18} {'o err':>8} {'dq err':>8} {'dk err':>8} {'dv err':>8}  amax s,o,dq,dk,dv,dp")
    for r in rows:
        if "err" in r:
            print(f"{r['variant']:>18} " + " ".join(f"{e:8.3f}" for e in r["err"]) + "  " +
                  ",".join(f"{a:.3g}" for a in r["amax_s_o_dq_dk_dv_dp"]))
        else:
            print(f"{r['variant']:>18} {r['error'][:100]}")


if __name__ == "__main__":
    main()
