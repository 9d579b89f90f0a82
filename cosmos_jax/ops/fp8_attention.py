"""fp8 self-attention on Hopper through cuDNN's fp8 flash attention (JAX's private primitives: JAX has no public fp8
attention that returns the softmax statistics), as `flash.Kernels` pairs for `flash.flash_attention`.

  fp8       forward in fp8 with per-tensor current scaling: power-of-two scales from each call's amax of q, k, v
            (`fp8_scale`), o scaled from amax(v) (a softmax average never exceeds it), the probabilities at 256.
            Its softmax statistics feed FA3's bf16 backward, so gradients never pass through fp8 and no scaling
            state is carried between steps.
  fp8_full  the same forward and cuDNN's fp8 backward, its 12 scale operands placed as XLA reads them
            (FP8_BWD_SCALE_ORDER: JAX 0.10-0.11's own order gives garbage gradients). Stateless too: q, k, v, o
            re-quantised as the forward had them, the backward's normalised probabilities from the forward
            kernel's amax of them (a kernel residual, `Kernels` aux), dO from its amax, dS and dq/dk/dv from exact
            gradients of FP8_GRAD_SAMPLES strided query rows and key columns with two powers of two of headroom
            (`fp8_grad_amaxes`); where the kernel's own amax outputs show a tensor saturated, the backward runs
            again with scales from them (`fp8_backward_with_retry`).

Measured (bench/bench_fp8.py, README): the forward's output error is 3-5 % (the e4m3 output), against 0.2 % for
bf16; fp8 fwd+bwd 1.15-1.17x cuDNN bf16 at ~1e-2 gradient error; fp8_full 1.22-1.23x (28,800 tokens) to
1.25-1.28x (57,600-201,600) at 7.3e-2 gradient error at every length (0.19 at 201,600 before the backward's
probabilities were scaled from the forward's amax). `*_emulation_kernels` are the same
arithmetic in plain XLA for CPU tests. Sequences must be multiples of 64 (no padding mask) and head_dim 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cosmos_jax.ops import flash
from cosmos_jax.ops.flash import AttentionBackendError, Kernels

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_PROBS_SCALE = 256.0  # the probabilities' scale: their flash form exp(s - row max) peaks at 1 (2**8 <= 448)
# Headroom (powers of two) below 448 per input. v: on an H200 the output error doubled (5.8 % -> 11 %) with v scaled
# to the top of the range (448 / amax) and did not change from 1/4 up to 64 / amax (bench/probes/fp8_scales.py).
FP8_MARGIN = {"q": 0, "k": 0, "v": 2, "o": 0}


def fp8_scale(amax, margin: int = 0):
    """The power-of-two scale s with amax * s <= 448 / 2**margin (as large as that allows; cuDNN's advice: powers of
    two rescale exactly); 1 where amax is 0 or not finite. f32 scalar."""
    a = jnp.asarray(amax, jnp.float32)
    ok = jnp.isfinite(a) & (a > 0)
    _, e = jnp.frexp(FP8_MAX / jnp.where(ok, a, 1.0))  # 448 / a = f * 2**e, f in [0.5, 1): floor(log2) = e - 1
    return jnp.where(ok, jnp.ldexp(jnp.float32(1.0), e - 1 - margin), 1.0)


def fp8_quantize(x, scale):
    """float8_e4m3fn(x * scale), saturating at +-448 (a plain cast would give NaN beyond it)."""
    return jnp.clip(x.astype(jnp.float32) * scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def _amax(x):
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def fp8_input_scales(q, k, v):
    """(scale q, scale k, scale v, scale o) of one call: current scaling from each tensor's amax."""
    amax_v = _amax(v)
    return (fp8_scale(_amax(q), FP8_MARGIN["q"]), fp8_scale(_amax(k), FP8_MARGIN["k"]),
            fp8_scale(amax_v, FP8_MARGIN["v"]), fp8_scale(amax_v, FP8_MARGIN["o"]))


def _fp8_scalar(x):
    """A scale or descale operand of JAX's fp8 attention primitives: f32 [1, 1, 1, 1]."""
    return jnp.reshape(x, (1, 1, 1, 1)).astype(jnp.float32)


def _cudnn_fp8_forward(q, k, v, scale):
    """cuDNN's fp8 flash-attention forward -> (out in q's dtype, softmax log-sum-exp f32 [B, H, S], amax of the
    probabilities f32 []: the kernel's own measure of softmax(q k^T scale), what fp8_full's backward scales its
    recomputed probabilities by)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa  # JAX has no public fp8 attention with statistics

    sq, sk, sv, so = fp8_input_scales(q, k, v)
    ss = jnp.float32(FP8_PROBS_SCALE)
    o8, amax_p, _, stats = fa._dot_product_attention_fp8_fwd_p_wrapper.bind(
        fp8_quantize(q, sq), fp8_quantize(k, sk), fp8_quantize(v, sv), _fp8_scalar(1 / sq), _fp8_scalar(1 / sk), _fp8_scalar(1 / sv),
        _fp8_scalar(1 / ss), _fp8_scalar(ss), _fp8_scalar(so), scale=float(scale), use_causal_mask=False,
        layout=fa.AttentionLayout.BTNH.value, is_training=True)
    return ((o8.astype(jnp.float32) / so).astype(q.dtype), stats.reshape(q.shape[0], q.shape[2], q.shape[1]),
            jnp.max(amax_p).astype(jnp.float32))


def _cudnn_fp8_forward_out_lse(q, k, v, scale):  # the fp8 backend's forward: its backward needs no aux
    return _cudnn_fp8_forward(q, k, v, scale)[:2]


def _fp8_backward(do, q, k, v, o, lse, scale):
    flash.fa3_kernels()  # registers the wheel's FFI targets; a clear error where it is not installed
    return flash.fa3_backward(do, q, k, v, o, lse, scale)


def fp8_kernels() -> Kernels:
    """The fp8 backend's kernel pair: cuDNN fp8 forward, FA3 bf16 backward from its statistics."""
    return Kernels(fwd=_cudnn_fp8_forward_out_lse, bwd=_fp8_backward)  # module functions: equal on every call


# fp8 backward (cuDNN): the fp8_full backend

# The fp8 backward custom call's 12 scale operands in the order XLA binds them to cuDNN's sdpa_fp8_backward inputs
# (openxla/xla stream_executor/cuda/cuda_dnn.cc, GetCudnnFlashAttentionBackwardF8OperationGraph: tensor UIDs in
# creation order, operand i -> UID i). JAX 0.10-0.11's primitive names them in another order
# (JAX_FP8_BWD_SCALE_ORDER: descale o, dO, s in the places of descale s, o, dO and scale dQ, dK, dV, dP in those of
# scale dP, dQ, dK, dV) and passes them straight through, so binding it in JAX's own order gives garbage
# gradients (seen on an H200: relative error 1.0; in XLA's order 7e-2, bench/bench_fp8.py). The primitive is bound
# here with each value at the place XLA reads it from; FP8_BWD_JAX_VERSIONS are the JAX versions this was checked
# against (a later JAX may fix its order, which would silently swap scales again: resolve_backend refuses others).
FP8_BWD_SCALE_ORDER = ("descale_q", "descale_k", "descale_v", "descale_s", "descale_o", "descale_do", "descale_dp",
                       "scale_s", "scale_dp", "scale_dq", "scale_dk", "scale_dv")
JAX_FP8_BWD_SCALE_ORDER = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_do", "descale_s",
                           "descale_dp", "scale_s", "scale_dq", "scale_dk", "scale_dv", "scale_dp")
FP8_BWD_JAX_VERSIONS = ("0.10.", "0.11.")
# Gradient scales are estimated per call from exact gradients of FP8_GRAD_SAMPLES strided query rows and key
# columns (about 1.6 * samples / S of the backward's FLOPs), with FP8_GRAD_MARGIN powers of two of headroom for
# the rows and columns not sampled; where a tensor saturates anyway, the call is rerun (fp8_backward_with_retry).
# 64: on an H200 (bench/bench_fp8.py --grad_samples, h200_fp8_grad_samples.jsonl) 64 rows gave the same errors as
# 128 at 1.224x instead of 1.198x cuDNN bf16 (28,800 x 16); 32 missed the peaks and paid the rerun on every call.
FP8_GRAD_SAMPLES = 64
FP8_GRAD_MARGIN = 2
# The backward recomputes the probabilities normalised (exp(s - lse): ~1/S where attention is spread), not in the
# forward's flash form that peaks at 1: at FP8_PROBS_SCALE most of them fell below e4m3's smallest subnormal at the
# 7-view length (gradient error 0.19 at 201,600 tokens, 7e-2 at 28,800, H200, h200_fp8_dp_shift.jsonl; scaling dS
# up did not change it). They are scaled from the forward kernel's exact amax of them instead, with
# FP8_PROBS_BWD_MARGIN powers of two of headroom (the backward recomputes them from the same fp8 q, k and lse):
# 7.3e-2 at 201,600 tokens too, same speed (h200_fp8_probs_amax.jsonl).
FP8_PROBS_BWD_MARGIN = 1
FP8_GRAD_NAMES = ("dp", "dq", "dk", "dv")  # the scales chosen from estimates, in fp8_grad_amaxes' order (dp: cuDNN's
#                                           name for dS * softmax scale)


def fp8_bwd_scale_operands(values: dict, order: str = "xla") -> list:
    """The fp8 backward primitive's 12 scale operands from {name: value} (names as in FP8_BWD_SCALE_ORDER), placed
    as XLA reads them (order="xla", what the product binds) or as JAX's primitive names them ("jax": the wrong
    gradients, kept for the bench)."""
    return [values[n] for n in {"xla": FP8_BWD_SCALE_ORDER, "jax": JAX_FP8_BWD_SCALE_ORDER}[order]]


def _strided(n_total: int, n: int):
    import numpy as np

    return np.unique((np.arange(min(n, n_total)) * n_total) // min(n, n_total))


FP8_GRAD_GROUP_ELEMENTS = 2 ** 26  # f32 elements of one sampled score block [B, heads, S, samples] (256 MiB)


def _head_group(batch: int, heads: int, seq: int, samples: int) -> int:
    """The most heads (a divisor of `heads`) whose sampled score blocks stay within FP8_GRAD_GROUP_ELEMENTS."""
    return max([g for g in range(1, heads + 1) if heads % g == 0 and batch * g * seq * samples
                <= FP8_GRAD_GROUP_ELEMENTS] or [1])


def fp8_grad_amaxes(do, q, k, v, o, lse, scale, samples: int | None = None):
    """Estimated amax of (dS * scale, dq, dk, dv) of one attention backward, dS = P o (dP - rowsum(dO o O)) (what
    cuDNN's fp8 backward scales with its "dP" scale: its amax output matched amax(dS * scale) on an H200): exact
    dq and dS rows for `samples` strided queries, exact dk, dv and dS columns for `samples` strided keys, from the
    forward's log-sum-exp. Products of the inputs' own dtype accumulate in f32 (bf16 inputs are not copied to f32);
    P and dS are rounded to that dtype before their second product, which moves an amax by < 1 %, far inside the
    scales' headroom. Heads are batched in groups whose [B, g, S, samples] f32 blocks fit FP8_GRAD_GROUP_ELEMENTS
    (all heads at once at the DiT's one-GPU 1-2 view lengths; a loop over groups beyond). `samples`: default
    FP8_GRAD_SAMPLES, read when traced. f32 [4]."""
    f32 = jnp.float32
    samples = FP8_GRAD_SAMPLES if samples is None else samples
    b, sq, h, _ = q.shape
    rows, cols = _strided(sq, samples), _strided(k.shape[1], samples)
    g = _head_group(b, h, max(sq, k.shape[1]), samples)

    def dot(spec, x, y):
        return jnp.einsum(spec, x, y.astype(x.dtype), preferred_element_type=f32)

    def group(x):  # heads [g]: q, k, v, do, o [B, S, g, D], lse [B, g, Sq]
        qh, kh, vh, doh, oh, lseh = x
        delta = dot("bqhd,bqhd->bhq", doh, oh)  # rowsum(dO o O), [B, g, Sq]
        # sampled queries: their dS rows and dq
        p = jnp.exp(dot("bqhd,bkhd->bhqk", qh[:, rows], kh) * scale - lseh[:, :, rows, None])
        ds_r = p * (dot("bqhd,bkhd->bhqk", doh[:, rows], vh) - delta[:, :, rows, None]) * scale
        dq = dot("bhqk,bkhd->bqhd", ds_r.astype(q.dtype), kh)
        # sampled keys: their dS columns, dk and dv
        p = jnp.exp(dot("bqhd,bkhd->bhqk", qh, kh[:, cols]) * scale - lseh[..., None])
        ds_c = p * (dot("bqhd,bkhd->bhqk", doh, vh[:, cols]) - delta[..., None]) * scale
        dk = dot("bhqk,bqhd->bkhd", ds_c.astype(q.dtype), qh)
        dv = dot("bhqk,bqhd->bkhd", p.astype(q.dtype), doh)
        return jnp.stack([jnp.maximum(_amax(ds_r), _amax(ds_c)), _amax(dq), _amax(dk), _amax(dv)])

    lse = lse.astype(f32)
    if g == h:
        return group((q, k, v, do, o, lse))

    def nth(i):  # the i-th group of heads, sliced inside the loop (no transposed copy of the inputs)
        return group(tuple(jax.lax.dynamic_slice_in_dim(x, i * g, g, axis=2) for x in (q, k, v, do, o))
                     + (jax.lax.dynamic_slice_in_dim(lse, i * g, g, axis=1),))

    return jnp.max(jax.lax.map(nth, jnp.arange(h // g)), axis=0)


def fp8_backward_scales(do, q, k, v, o, lse, scale, amax_p) -> dict:
    """Scales of one fp8 backward call: q, k, v, o as the forward had them (so the fp8 values are the forward's),
    the normalised probabilities from the forward's amax of them (`amax_p`, FP8_PROBS_BWD_MARGIN), dO from its
    amax, dS and dq/dk/dv from `fp8_grad_amaxes` with FP8_GRAD_MARGIN. Names as in FP8_BWD_SCALE_ORDER
    (scale_*: x * scale -> fp8)."""
    sq, sk, sv, so = fp8_input_scales(q, k, v)
    est = fp8_grad_amaxes(do, q, k, v, o, lse, scale)  # one estimate (a loop XLA would not merge if repeated)
    return {"q": sq, "k": sk, "v": sv, "o": so, "s": fp8_scale(amax_p, FP8_PROBS_BWD_MARGIN),
            "do": fp8_scale(_amax(do)),
            **{n: fp8_scale(est[i], FP8_GRAD_MARGIN) for i, n in enumerate(FP8_GRAD_NAMES)}}


FP8_RETRY_MARGIN = 1


def fp8_backward_with_retry(run, sc: dict):
    """run(scales) -> (gradients, {name: amax the kernel measured} for FP8_GRAD_NAMES). Where a measured amax shows
    that a tensor saturated under the estimated scale (amax * scale > 448: a sampled estimate missed a larger row
    or column), the backward runs once more with scales from the measured amaxes (FP8_RETRY_MARGIN powers of two of
    headroom: an amax measured downstream of a saturated dS can itself be low). Otherwise the first result stands;
    the retry costs one more backward, only when taken (lax.cond)."""
    grads, amax = run(sc)
    over = functools.reduce(jnp.logical_or, [amax[n] * sc[n] > FP8_MAX for n in FP8_GRAD_NAMES])

    def again(_):
        return run({**sc, **{n: fp8_scale(amax[n], FP8_RETRY_MARGIN) for n in FP8_GRAD_NAMES}})[0]

    return jax.lax.cond(over, again, lambda _: grads, None)


def _cudnn_fp8_backward(do, q, k, v, o, lse, scale, amax_p):
    """cuDNN's fp8 flash-attention backward (JAX's primitive, its scale operands placed for XLA) -> bf16 dq, dk, dv.
    q, k, v, o are re-quantised with the forward's power-of-two scales, which reproduces the forward's fp8 values
    exactly; the forward's log-sum-exp is the kernel's softmax statistics, `amax_p` its amax of the probabilities.
    Saturation is caught from the kernel's amax outputs (`fp8_backward_with_retry`)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    sc = fp8_backward_scales(do, q, k, v, o, lse, scale, amax_p)
    # quantised once: a rerun changes only the gradient scales
    x8 = {n: fp8_quantize(x, sc[n]) for n, x in (("q", q), ("k", k), ("v", v), ("o", o), ("do", do))}
    stats = lse.astype(jnp.float32)

    def run(scales):
        values = {f"descale_{n}": _fp8_scalar(1 / scales[n]) for n in ("q", "k", "v", "s", "o", "do", "dp")}
        values.update({f"scale_{n}": _fp8_scalar(scales[n]) for n in ("s", "dp", "dq", "dk", "dv")})
        dq8, dk8, dv8, a_dq, a_dk, a_dv, a_dp = fa._dot_product_attention_fp8_bwd_p_wrapper.bind(
            x8["q"], x8["k"], x8["v"], x8["o"], x8["do"], stats,
            *fp8_bwd_scale_operands(values, "xla"), scale=float(scale), use_causal_mask=False,
            layout=fa.AttentionLayout.BTNH.value)
        grads = tuple((g.astype(jnp.float32) / scales[n]).astype(x.dtype)
                      for g, n, x in ((dq8, "dq", q), (dk8, "dk", k), (dv8, "dv", v)))
        return grads, {n: jnp.max(a) for n, a in (("dp", a_dp), ("dq", a_dq), ("dk", a_dk), ("dv", a_dv))}

    return fp8_backward_with_retry(run, sc)


def fp8_full_kernels() -> Kernels:
    """The fp8_full backend's kernel pair: cuDNN fp8 forward and fp8 backward."""
    return Kernels(fwd=_cudnn_fp8_forward, bwd=_cudnn_fp8_backward)


def _fp8_emulation_forward(q, k, v, scale):
    """The fp8 forward in plain XLA: q, k, v and the output rounded through e4m3 with the kernel's scales, exact
    attention in between -> (out, lse, amax of the probabilities, as the cuDNN forward returns them)."""
    sq, sk, sv, so = fp8_input_scales(q, k, v)
    rt = [(fp8_quantize(x, s).astype(jnp.float32) / s).astype(x.dtype) for x, s in ((q, sq), (k, sk), (v, sv))]
    out, lse = flash.xla_kernels().fwd(*rt, scale)
    logits = jnp.einsum("bqhd,bkhd->bhqk", rt[0], rt[1], preferred_element_type=jnp.float32) * scale
    amax_p = jnp.max(jnp.exp(logits - lse[..., None]))
    return (fp8_quantize(out, so).astype(jnp.float32) / so).astype(q.dtype), lse, amax_p


def fp8_emulation_kernels() -> Kernels:
    """The fp8 backend's arithmetic in plain XLA (any device): the emulated fp8 forward (`_fp8_emulation_forward`)
    and the exact backward. CPU tests check the scaling against it; it does not model the kernel's own rounding of
    the probabilities."""
    return Kernels(fwd=_fp8_emulation_forward_out_lse, bwd=flash.xla_kernels().bwd)


def _fp8_emulation_forward_out_lse(q, k, v, scale):
    return _fp8_emulation_forward(q, k, v, scale)[:2]


def fp8_full_emulation_kernels() -> Kernels:
    """The fp8_full backend's arithmetic in plain XLA: the fp8 forward's emulation, and a backward that rounds
    through e4m3 where cuDNN's fp8 backward holds fp8 tensors (q, k, v, o, dO, the probabilities, dS, and its dq,
    dk, dv outputs) with the scales `fp8_backward_scales` picks. CPU tests check the scaling against it."""
    f32 = jnp.float32

    def rt(x, s):  # through e4m3 and back
        return fp8_quantize(x, s).astype(f32) / s

    def bwd(do, q, k, v, o, lse, scale, amax_p):
        sc = fp8_backward_scales(do, q, k, v, o, lse, scale, amax_p)
        q8, k8, v8, o8, do8 = (rt(x, sc[n]) for n, x in (("q", q), ("k", k), ("v", v), ("o", o), ("do", do)))

        def run(scales):  # as the kernel: gradients and the amaxes of dS * scale, dq, dk, dv before their rounding
            p = jnp.exp(jnp.einsum("bqhd,bkhd->bhqk", q8, k8) * scale - lse[..., None])
            dv = jnp.einsum("bhqk,bqhd->bkhd", rt(p, scales["s"]), do8)
            dp = jnp.einsum("bqhd,bkhd->bhqk", do8, v8)
            ds = p * (dp - jnp.einsum("bqhd,bqhd->bhq", do8, o8)[..., None]) * scale
            ds8 = rt(ds, scales["dp"])
            dq = jnp.einsum("bhqk,bkhd->bqhd", ds8, k8)
            dk = jnp.einsum("bhqk,bqhd->bkhd", ds8, q8)
            grads = tuple(rt(g, scales[n]).astype(x.dtype) for g, n, x in ((dq, "dq", q), (dk, "dk", k), (dv, "dv", v)))
            return grads, {"dp": _amax(ds), "dq": _amax(dq), "dk": _amax(dk), "dv": _amax(dv)}

        return fp8_backward_with_retry(run, sc)

    return Kernels(fwd=_fp8_emulation_forward, bwd=bwd)


FP8_SEQ_MULTIPLE = 64


def check_fp8_shape(q, k) -> None:
    flash.check_fa3_shape(q)
    for name, x in (("query", q), ("key", k)):
        if x.shape[1] % FP8_SEQ_MULTIPLE:
            raise AttentionBackendError(
                f"fp8 attention: {name} length {x.shape[1]} is not a multiple of {FP8_SEQ_MULTIPLE} (cuDNN's fp8 "
                "attention takes no padding mask); use attention_backend='fa3' for this shape")



def check_fp8_backward_jax(version: str | None = None) -> None:
    """fp8_full binds JAX's fp8 backward primitive with its scale operands re-placed for XLA (FP8_BWD_SCALE_ORDER);
    that is only right for the JAX versions it was checked against."""
    version = jax.__version__ if version is None else version
    if not version.startswith(FP8_BWD_JAX_VERSIONS):
        raise AttentionBackendError(
            f"attention_backend 'fp8_full' was checked against JAX {', '.join(v + 'x' for v in FP8_BWD_JAX_VERSIONS)}"
            f" only (its fp8 backward re-orders JAX's scale operands for XLA), this is JAX {version}: run "
            "bench/bench_fp8.py to check the gradients, then add the version to FP8_BWD_JAX_VERSIONS; or use 'fp8'")

