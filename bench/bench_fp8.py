"""fp8 attention on one GPU: can it be had, how fast is it against bf16 cuDNN in the same run, what error does it add.

    python bench/bench_fp8.py                                   # 4,096x16 (errors vs fp32) + 28,800x16 + 57,600x16
    python bench/bench_fp8.py --shapes 4096x16

Rows per shape S x H (q, k, v [1, S, H, 128], unit-normal bf16; cotangent unit-normal):
  fwd+bwd  cudnn (baseline) | fa3 |
           cudnn_fp8 (cuDNN's fp8 forward *and* backward through JAX's fp8 primitives, e4m3 everywhere, including
           dO, dP and dQ/dK/dV; per-tensor current scaling of q, k, v, dO; probabilities at 448 (their unnormalised
           flash form peaks at 1); o, dP, dQ/dK/dV from a first call's amax outputs, i.e. delayed scaling after one
           step; the first call's own errors are in the JSON row; the backward's scale operands placed as XLA
           reads them, ops.fp8_attention.FP8_BWD_SCALE_ORDER) | cudnn_fp8_jaxorder (the same, placed as JAX's wrapper passes them) |
           cudnn_fp8_pow2 (the same kernels, q/k/v/o scaled as the product's fp8 forward does, power-of-two scales,
           dP from a Cauchy-Schwarz bound in the first call, dP and dq/dk/dv delayed in the timed one) |
           cudnn_fp8_unit (the same primitives with every scale 1, as JAX's own fp8 test calls them: tells a wrong
           scale plumbing here from a wrong kernel) |
           cudnn_fp8_pow2@dpK (--dp_shifts: its dS scale 2**K larger) | cudnn_fp8_pow2@pamax (--probs_from_amax:
           the backward's normalised probabilities scaled from the forward's amax of them, as fp8_full does) |
           fp8 (the product's backend, ops/fp8_attention.py: cuDNN fp8 forward with per-call power-of-two scales,
           FA3's bf16 backward from its softmax statistics) | fp8_full (the product's all-fp8 backend: the same
           forward, cuDNN's fp8 backward with per-call scales from sampled gradient rows and columns) |
           fp8_full@N (--grad_samples: N sampled rows / columns instead of FP8_GRAD_SAMPLES)
  fwd      cudnn | fa3 | fp8 (the same backend's forward: what inference runs) |
           fa3_fp8 (the flash-attn3-jax wheel's FFI target called with e4m3 q, k, v and descales)
Errors are relative L2 norms of the output and the worst of dq, dk, dv: against an fp32 XLA reference where S is
small enough (4,096), else against the cudnn bf16 row. FLOPs: forward 4*S^2*H*D, backward 2.5x forward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cosmos_jax.ops.fp8_attention import (  # noqa: E402  (the product's)
    FP8_MAX as E4M3_MAX,
    fp8_bwd_scale_operands,  # order "xla" as XLA reads them, "jax" as JAX names them (the cudnn_fp8_jaxorder row)
    fp8_quantize as quantize,
)


def amax(x):
    import jax.numpy as jnp

    return jnp.max(jnp.abs(x.astype(jnp.float32)))


def scale_from_amax(a, fmax: float = E4M3_MAX):
    """x * scale spans [-fmax, fmax]; 1 where amax is 0 or not finite."""
    import jax.numpy as jnp

    a = jnp.asarray(a, jnp.float32)
    ok = jnp.isfinite(a) & (a > 0)
    return jnp.where(ok, fmax / jnp.where(ok, a, 1.0), 1.0)


def dequantize(x8, descale):
    import jax.numpy as jnp

    return (x8.astype(jnp.float32) * descale).astype(jnp.bfloat16)


def fa3_fp8_forward(q, k, v):
    """The wheel's forward FFI target with e4m3 q, k, v (per-tensor current scaling) -> bf16 out."""
    import jax
    import jax.numpy as jnp

    from cosmos_jax.ops import flash

    flash.fa3_kernels()  # imports the wheel, which registers its FFI targets
    scales = [scale_from_amax(amax(x)) for x in (q, k, v)]
    q8, k8, v8 = (quantize(x, s) for x, s in zip((q, k, v), scales))
    b, sq, h, d = q.shape
    desc = [jnp.broadcast_to(1.0 / s, (b, k.shape[2])).astype(jnp.float32) for s in scales]
    e_i32, e_bf16 = jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.bfloat16)
    out, _, _, _ = jax.ffi.ffi_call(
        "flash_mha_fwd", result_shape_dtypes=[
            jax.ShapeDtypeStruct((b, sq, h, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, h, sq), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32), jax.ShapeDtypeStruct((1, 1, 1), jnp.float32)],
        has_side_effect=False, input_layouts=[None] * 21, output_layouts=[None] * 4)(
        q8, k8, v8, e_bf16, e_bf16, e_bf16, *([e_i32] * 8), e_bf16, e_bf16, e_i32, *desc, e_i32,
        max_seqlen_q=sq, max_seqlen_q_has_value=True, max_seqlen_k=k.shape[1], max_seqlen_k_has_value=True,
        softmax_scale_val=1.0 / math.sqrt(d), softmax_scale_has_value=True, pack_gqa_val=False,
        pack_gqa_has_value=False, is_causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0,
        softcap=0.0, is_rotary_interleaved=False, num_splits=1, sm_margin=0)
    return out


def cudnn_fp8_fn(d: int, order: str = "xla"):
    """(q, k, v, do, scales[10]) -> (out, dq, dk, dv, amaxes[6]) through cuDNN's fp8 attention primitives; `order`:
    how the backward's scale operands are placed (see ops.fp8_attention.FP8_BWD_SCALE_ORDER)."""
    import jax.numpy as jnp
    from jax._src.cudnn import fused_attention_stablehlo as fa

    layout = fa.AttentionLayout.BTNH.value
    scale = 1.0 / math.sqrt(d)

    def one(x):
        return jnp.reshape(x, (1, 1, 1, 1)).astype(jnp.float32)

    def run(q, k, v, do, s):
        # s: q, k, v, s (probabilities), o, do, dp, dq, dk, dv scales (x * scale -> fp8) [, the backward's
        # probability scale: the forward's where absent]
        sq, sk, sv, ss, so, sdo, sdp, sdq, sdk, sdv = (s[i] for i in range(10))
        ssb = s[10] if s.shape[0] > 10 else ss
        q8, k8, v8 = quantize(q, sq), quantize(k, sk), quantize(v, sv)
        o8, amax_s, amax_o, stats = fa._dot_product_attention_fp8_fwd_p_wrapper.bind(
            q8, k8, v8, one(1 / sq), one(1 / sk), one(1 / sv), one(1 / ss), one(ss), one(so),
            scale=scale, use_causal_mask=False, layout=layout, is_training=True)
        do8 = quantize(do, sdo)
        dq8, dk8, dv8, amax_dq, amax_dk, amax_dv, amax_dp = fa._dot_product_attention_fp8_bwd_p_wrapper.bind(
            q8, k8, v8, o8, do8, stats, *fp8_bwd_scale_operands(dict(
                descale_q=one(1 / sq), descale_k=one(1 / sk), descale_v=one(1 / sv), descale_s=one(1 / ssb),
                descale_o=one(1 / so), descale_do=one(1 / sdo), descale_dp=one(1 / sdp), scale_s=one(ssb),
                scale_dp=one(sdp), scale_dq=one(sdq), scale_dk=one(sdk), scale_dv=one(sdv)), order),
            scale=scale, use_causal_mask=False, layout=layout)
        deq = [dequantize(x, 1 / sc) for x, sc in ((o8, so), (dq8, sdq), (dk8, sdk), (dv8, sdv))]
        amaxes = jnp.stack([jnp.max(a) for a in (amax_s, amax_o, amax_dq, amax_dk, amax_dv, amax_dp)])
        return (*deq, amaxes)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x16,28800x16,57600x16", help="comma list of SxH")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backends", default="", help="comma list of rows to run besides cuDNN bf16 (default: all)")
    ap.add_argument("--grad_samples", default="", help="comma list: extra fp8_full rows (named fp8_full@N) with N "
                    "sampled gradient rows/columns instead of ops.fp8_attention.FP8_GRAD_SAMPLES")
    ap.add_argument("--dp_shifts", default="", help="comma list of k: extra cudnn_fp8_pow2@dpk rows whose dS (cuDNN's "
                    "dP) scale is 2**k times the power of two from its true amax (k > 0 lets the largest values "
                    "saturate: trades outliers for the small values' precision)")
    ap.add_argument("--probs_from_amax", action="store_true", help="an extra cudnn_fp8_pow2@pamax row: the "
                    "backward's (normalised) probabilities scaled from the forward's amax of them, as fp8_full "
                    "does, instead of the forward's flash-form scale")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_fp8.jsonl")
    args = ap.parse_args()
    keep = set(filter(None, args.backends.split(",")))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.common import timeit
    from cosmos_jax.ops import attention as attn
    from cosmos_jax.ops import fp8_attention as fp8_attn

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    default_samples = fp8_attn.FP8_GRAD_SAMPLES

    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    for shape in args.shapes.split(","):
        s, h = (int(x) for x in shape.split("x"))
        d = 128
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v, ct = (jax.random.normal(kk, (1, s, h, d), jnp.bfloat16) for kk in ks)
        fwd_flops = 4 * s * s * h * d
        ref = None
        if s <= 4096:  # fp32 reference
            def ref_loss(q, k, v):
                o = attn.local_attention(q, k, v, backend="xla")
                return jnp.sum(o * ct.astype(jnp.float32)), o
            with jax.default_matmul_precision("highest"):
                (_, o32), g32 = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True))(
                    *(x.astype(jnp.float32) for x in (q, k, v)))
            ref = [np.asarray(x) for x in (o32, *g32)]
        base = {}

        def record(row, res, secs, flops, mode):
            row.update(s=secs, tflops=flops / secs / 1e12)
            if mode not in base:
                base[mode] = (secs, res)
            row["x_cudnn"] = base[mode][0] / secs
            target = ref if ref is not None else base[mode][1]
            row["vs"] = "fp32" if ref is not None else "cudnn_bf16"
            row["rel_err_out"] = rel(res[0], target[0])
            if len(res) > 1:
                row["rel_err_grad"] = max(rel(a, r) for a, r in zip(res[1:], target[1:]))

        def attempt(mode, backend, body):
            """One row: body(row) -> (fn, fn_args, flops, outputs of fn's result); fn is run, checked and timed."""
            if keep and backend not in keep and backend != "cudnn" and "@" not in backend:  # cuDNN bf16: every
                # row's baseline; fp8_full@N rows: asked for by --grad_samples
                return
            row = {"S": s, "H": h, "mode": mode, "backend": backend}
            try:
                fn, fn_args, flops, outputs = body(row)
                res = [np.asarray(x, np.float32) for x in outputs(fn(*fn_args))]
                record(row, res, timeit(fn, *fn_args, iters=args.iters), flops, mode)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(os.path.join(args.out, "bench_fp8.jsonl"), "a") as fh:  # row by row: a cut-off run keeps them
                fh.write(json.dumps(row) + "\n")

        def product_op(b, grad, samples=None):  # the net's attention op, fwd + bwd or forward only
            def body(row):
                if samples is not None:  # traced below, inside this row: the estimate's sample count of this row
                    fp8_attn.FP8_GRAD_SAMPLES = samples
                    row["grad_samples"] = samples
                if not grad:
                    f = jax.jit(lambda q, k, v: attn.local_attention(q, k, v, backend=b, site="self_attn"))
                    return f, (q, k, v), fwd_flops, lambda o: [o]

                def loss(q, k, v):
                    o = attn.local_attention(q, k, v, backend=b, site="self_attn")
                    return jnp.sum(o.astype(jnp.float32) * ct.astype(jnp.float32)), o
                f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
                return f, (q, k, v), 3.5 * fwd_flops, lambda r: [r[0][1], *r[1]]
            return body

        runs = {order: jax.jit(cudnn_fp8_fn(d, order)) for order in ("xla", "jax")}

        def cudnn_fp8_delayed(order, pow2=False):
            def body(row):
                if pow2:  # the product's forward scaling (ops.attention), every other scale a power of two
                    return pow2_body(row, order)
                # first call: q/k/v/do from their amax (v with 2 powers of two of headroom: at the top of e4m3 the
                # forward's error doubled); o bounded by v's amax; probabilities at 448 (their flash form peaks
                # at 1); dP by Cauchy-Schwarz; dq/dk/dv from the bf16 gradients' amax (what delayed scaling
                # converges to)
                run = runs[order]
                gref = base["fwd+bwd"][1]
                a = [amax(x) for x in (q, k, v)]
                norm = lambda x: jnp.max(jnp.linalg.norm(x.astype(jnp.float32), axis=-1))  # noqa: E731
                first = jnp.stack([scale_from_amax(x) for x in (
                    a[0], a[1], 4 * a[2], jnp.float32(1.0), a[2], amax(ct), 2 * norm(ct) * norm(v),
                    *(float(np.abs(x).max()) for x in gref[1:]))])
                *res1, amaxes = run(q, k, v, ct, first)
                target = ref if ref is not None else gref
                row["rel_err_out_first_call"] = rel(res1[0], target[0])
                row["rel_err_grad_first_call"] = max(rel(x, r) for x, r in zip(res1[1:], target[1:]))
                row["amax_s_o_dq_dk_dv_dp"] = np.asarray(amaxes).tolist()
                # second call: o, dq, dk, dv, dP from the first call's amax outputs (delayed scaling after a step)
                second = first.at[jnp.array([4, 7, 8, 9, 6])].set(
                    jnp.stack([scale_from_amax(amaxes[i]) for i in (1, 2, 3, 4, 5)]))
                return run, (q, k, v, ct, second), 3.5 * fwd_flops, lambda r: r[:4]
            return body

        def pow2_body(row, order, dp_shift=0, probs_from_amax=False):
            # q, k, v, o as the product's fp8 forward scales them (powers of two, v and o from amax(v) with its
            # headroom), probabilities at FP8_PROBS_SCALE, dO from its amax; first call: dP from the Cauchy-Schwarz
            # bound |dP_ij| <= |dO_i| |v_j| (current scaling, no state; its errors are the *_first_call fields),
            # dq/dk/dv from the bf16 gradients' amax; the timed call: dP and dq/dk/dv from the first call's amax
            # outputs (delayed scaling after one step)
            run = runs[order]
            gref = base["fwd+bwd"][1]
            norm = lambda x: jnp.max(jnp.linalg.norm(x.astype(jnp.float32), axis=-1))  # noqa: E731
            sq, sk, sv, so = fp8_attn.fp8_input_scales(q, k, v)
            first = jnp.stack([sq, sk, sv, jnp.float32(fp8_attn.FP8_PROBS_SCALE), so, fp8_attn.fp8_scale(amax(ct)),
                               fp8_attn.fp8_scale(norm(ct) * norm(v)),
                               *(fp8_attn.fp8_scale(float(np.abs(x).max())) for x in gref[1:])])
            *res1, amaxes = run(q, k, v, ct, first)
            target = ref if ref is not None else gref
            row["rel_err_out_first_call"] = rel(res1[0], target[0])
            row["rel_err_grad_first_call"] = max(rel(x, r) for x, r in zip(res1[1:], target[1:]))
            row["amax_s_o_dq_dk_dv_dp"] = np.asarray(amaxes).tolist()
            # second call: dP and dq/dk/dv from the first call's amax outputs (delayed scaling after one step)
            second = first.at[jnp.array([6, 7, 8, 9])].set(
                jnp.stack([fp8_attn.fp8_scale(amaxes[i]) for i in (5, 2, 3, 4)]))
            if dp_shift:
                row["dp_shift"] = dp_shift
                second = second.at[6].multiply(2.0 ** dp_shift)
            if probs_from_amax:  # as ops.fp8_attention.fp8_backward_scales
                second = jnp.concatenate([second, fp8_attn.fp8_scale(amaxes[0], fp8_attn.FP8_PROBS_BWD_MARGIN)[None]])
            return run, (q, k, v, ct, second), 3.5 * fwd_flops, lambda r: r[:4]

        def cudnn_fp8_unit(row):
            return runs["xla"], (q, k, v, ct, jnp.ones((10,), jnp.float32)), 3.5 * fwd_flops, lambda r: r[:4]

        def fa3_fp8_fwd(row):
            return jax.jit(fa3_fp8_forward), (q, k, v), fwd_flops, lambda o: [o]

        for b in ("cudnn", "fa3"):
            attempt("fwd+bwd", b, product_op(b, grad=True))
        attempt("fwd+bwd", "cudnn_fp8", cudnn_fp8_delayed("xla"))
        attempt("fwd+bwd", "cudnn_fp8_pow2", cudnn_fp8_delayed("xla", pow2=True))
        for kk in filter(None, args.dp_shifts.split(",")):
            attempt("fwd+bwd", f"cudnn_fp8_pow2@dp{kk}", lambda row, kk=kk: pow2_body(row, "xla", int(kk)))
        if args.probs_from_amax:
            attempt("fwd+bwd", "cudnn_fp8_pow2@pamax", lambda row: pow2_body(row, "xla", probs_from_amax=True))
        attempt("fwd+bwd", "cudnn_fp8_jaxorder", cudnn_fp8_delayed("jax"))
        attempt("fwd+bwd", "cudnn_fp8_unit", cudnn_fp8_unit)
        attempt("fwd+bwd", "fp8", product_op("fp8", grad=True))
        attempt("fwd+bwd", "fp8_full", product_op("fp8_full", grad=True, samples=default_samples))
        for n in filter(None, args.grad_samples.split(",")):
            attempt("fwd+bwd", f"fp8_full@{n}", product_op("fp8_full", grad=True, samples=int(n)))
        fp8_attn.FP8_GRAD_SAMPLES = default_samples
        for b in ("cudnn", "fa3"):
            attempt("fwd", b, product_op(b, grad=False))
        attempt("fwd", "fp8", product_op("fp8", grad=False))
        attempt("fwd", "fa3_fp8", fa3_fp8_fwd)

    print(f"\n{'S x H':>12} {'mode':>7} {'backend':>9} {'ms':>8} {'TFLOP/s':>8} {'x cudnn':>8} {'vs':>10} "
          f"{'out err':>8} {'grad err':>8}")
    for r in rows:
        if "s" not in r:
            print(f"{r['S']:>7}x{r['H']:<4} {r['mode']:>7} {r['backend']:>9} {r['error'][:90]}")
            continue
        print(f"{r['S']:>7}x{r['H']:<4} {r['mode']:>7} {r['backend']:>9} {r['s'] * 1e3:>8.2f} {r['tflops']:>8.1f} "
              f"{r['x_cudnn']:>8.3f} {r['vs']:>10} {r['rel_err_out']:>8.1e} {r.get('rel_err_grad', 0):>8.1e}")


if __name__ == "__main__":
    main()
