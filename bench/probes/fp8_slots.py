"""Follow-up of fp8_scales.py: (1) how v's and o's scales change the fp8 forward's error; (2) whether the fp8
backward's scale inputs act in a different order than JAX's wrapper names them. The first probe's data fit this
reading: the slot JAX calls scale_dQ acts as dP's scale, scale_dK as dQ's, scale_dV as dK's, scale_dP as dV's.

    python bench/probes/fp8_slots.py
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.cudnn import fused_attention_stablehlo as fa

    from bench.bench_fp8 import quantize, dequantize
    from cosmos_jax.ops import attention as attn

    s, h, d = 4096, 16, 128
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (1, s, h, d), jnp.bfloat16) for kk in ks)
    f32 = jnp.float32
    with jax.default_matmul_precision("highest"):
        def ref_loss(q, k, v):
            o = attn.local_attention(q, k, v, backend="xla")
            return jnp.sum(o * ct.astype(f32)), o
        (_, o32), g32 = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True))(
            *(x.astype(f32) for x in (q, k, v)))
        # dS = P * (dO V^T - D) (before the softmax scale): its amax is what dP's scale must cover
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32)) / math.sqrt(d)
        p = jax.nn.softmax(logits, -1)
        dp = jnp.einsum("bqhd,bkhd->bhqk", ct.astype(f32), v.astype(f32))
        delta = jnp.einsum("bqhd,bqhd->bhq", ct.astype(f32), o32)
        amax_ds = float(jnp.max(jnp.abs(p * (dp - delta[..., None]))))
    ref = [np.asarray(x, np.float32) for x in (o32, *g32)]
    am = {"o": float(np.abs(ref[0]).max()), "dq": float(np.abs(ref[1]).max()), "dk": float(np.abs(ref[2]).max()),
          "dv": float(np.abs(ref[3]).max()), "ds": amax_ds,
          **{n: float(jnp.max(jnp.abs(x.astype(f32)))) for n, x in zip(("q", "k", "v", "do"), (q, k, v, ct))}}
    print("true amax", json.dumps(am), flush=True)

    def one(x):
        return jnp.reshape(x, (1, 1, 1, 1)).astype(f32)

    @jax.jit
    def run(fs, bs):
        """fs: q, k, v, s, o, do scales; bs: the five backward scale slots in JAX's order (scale_s, scale_dQ,
        scale_dK, scale_dV, scale_dP) and the two descale slots (descale_s, descale_dP); dq/dk/dv dequantised with
        fs[6:9]."""
        sq, sk, sv, ss, so, sdo = (fs[i] for i in range(6))
        q8, k8, v8 = quantize(q, sq), quantize(k, sk), quantize(v, sv)
        o8, amax_s, amax_o, stats = fa._dot_product_attention_fp8_fwd_p_wrapper.bind(
            q8, k8, v8, one(1 / sq), one(1 / sk), one(1 / sv), one(1 / ss), one(ss), one(so),
            scale=1 / math.sqrt(d), use_causal_mask=False, layout=fa.AttentionLayout.BTNH.value, is_training=True)
        do8 = quantize(ct, sdo)
        dq8, dk8, dv8, *amaxes = fa._dot_product_attention_fp8_bwd_p_wrapper.bind(
            q8, k8, v8, o8, do8, stats, one(1 / sq), one(1 / sk), one(1 / sv), one(1 / so), one(1 / sdo),
            one(bs[5]), one(bs[6]), one(bs[0]), one(bs[1]), one(bs[2]), one(bs[3]), one(bs[4]),
            scale=1 / math.sqrt(d), use_causal_mask=False, layout=fa.AttentionLayout.BTNH.value)
        outs = [dequantize(o8, 1 / so)] + [dequantize(x, 1 / fs[6 + i]) for i, x in enumerate((dq8, dk8, dv8))]
        return outs, jnp.stack([jnp.max(a) for a in (amax_s, amax_o, *amaxes)])

    def rel(a, b):
        return float(np.linalg.norm(np.asarray(a, np.float32) - b) / np.linalg.norm(b))

    c = {x: 448 / am[x] for x in am}
    rows = []

    def go(name, fwd, bwd=None, deq=None):
        # fwd: dict of q,k,v,s,o,do scales (default 1); bwd: the seven slot values; deq: dq, dk, dv output scales
        fs = [fwd.get(n, 1.0) for n in ("q", "k", "v", "s", "o", "do")] + list(deq or (1.0, 1.0, 1.0))
        bs = bwd or [fs[3], 1.0, 1.0, 1.0, 1.0, 1 / fs[3], 1.0]
        outs, amaxes = run(jnp.asarray(fs, f32), jnp.asarray(bs, f32))
        row = {"variant": name, "err": [rel(a, r) for a, r in zip(outs, ref)], "amax": np.asarray(amaxes).tolist()}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # (1) forward: v and o scales
    for sv in (1.0, 4.0, 16.0, 64.0, c["v"]):
        go(f"fwd v {sv:.3g}", {"v": sv})
    go("fwd v 1, o 448/amax", {"o": c["o"]})
    go("fwd v 448/amax, o 448/amax", {"v": c["v"], "o": c["o"]})
    go("fwd v 448/amax, o 448/amax(v)", {"v": c["v"], "o": c["v"]})
    go("fwd q,k 448/amax", {"q": c["q"], "k": c["k"]})
    go("fwd v 1/4", {"v": 0.25})
    # (2) backward slot order. Reading A: slots (scale_s, dP, dQ, dK, dV), descales (descale_s, descale_dP)
    for ss in (1.0, 16.0, 448.0):
        for sdp in (c["ds"], c["ds"] / 16):
            fwd = {"q": c["q"], "k": c["k"], "do": c["do"], "s": ss}
            bwd = [ss, sdp, c["dq"], c["dk"], c["dv"], 1 / ss, 1 / sdp]
            go(f"bwd A s {ss:g} dp {sdp:.3g}", fwd, bwd, (c["dq"], c["dk"], c["dv"]))
            # the same with dq, dk read back with an extra factor ss (if the kernel divides them by scale_s)
            go(f"bwd A s {ss:g} dp {sdp:.3g} dqdk*s", fwd, bwd, (c["dq"] / ss, c["dk"] / ss, c["dv"]))
    # JAX's own reading with the true amaxes
    fwd = {"q": c["q"], "k": c["k"], "do": c["do"], "s": 448.0}
    go("bwd JAX order", fwd, [448.0, c["dq"], c["dk"], c["dv"], c["ds"], 1 / 448, 1 / c["ds"]],
       (c["dq"], c["dk"], c["dv"]))
    with open(os.path.join(os.environ.get("OUT", "."), "fp8_slots.jsonl"), "a") as fh:
        fh.write(json.dumps({"true_amax": am}) + "\n")
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print(f"\n{'variant':>40} {'o err':>8} {'dq err':>8} {'dk err':>8} {'dv err':>8}")
    for r in rows:
        print(f"{r['variant']:>40} " + " ".join(f"{e:8.3g}" for e in r["err"]))


if __name__ == "__main__":
    main()
