"""One attention op with named backends, and Ulysses context parallelism around it.

Layout of the local op: q [B, Sq, H, D], k/v [B, Skv, H, D] (the reference's "bshd"). Softmax scale 1/sqrt(D), no
mask (the reference uses `attn_mask_type="no_mask"`); padding that we add ourselves is excluded through sequence
lengths.

Backends
  xla    plain einsum softmax in fp32 accumulation; any device, any length (CPU tests, parity).
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention, GPU, bf16/fp16 only).
         cuDNN's backward rejects odd lengths and is fastest on multiples of 64, so sequences are padded to a
         multiple of 64 and the true lengths are passed as `query_seq_lengths` / `key_value_seq_lengths`.
  fa3    FlashAttention-3 (Hopper, bf16/fp16, head_dim 128) through the `flash-attn3-jax` wheel's XLA FFI kernels,
         any sequence length. Its forward and backward kernels are wrapped in our own `jax.custom_vjp` whose
         forward names the kernel's output and log-sum-exp (`<site>_kernel_out`, `<site>_kernel_lse`, site
         `self_attn` or `cross_attn`), so a remat policy that saves those names keeps the backward from rerunning
         the attention forward (a policy cannot see inside the wheel's own custom_vjp). The backward kernel is
         called through the wheel's FFI target with scratch buffers sized for every tile height (`_fa3_backward`:
         the wheel's own lowering under-sizes them for some lengths), and a jitted program that uses the backend
         must be compiled with `compiler_options("fa3")` (the trainer does), else XLA duplicates every forward
         whose output a scanned gradient saves.
  fp8    (opt-in, Hopper) self-attention forward in fp8 through cuDNN's fp8 flash attention (JAX's primitive), with
         per-tensor current scaling: power-of-two scales from each call's amax of q, k, v (`fp8_scale`), o scaled
         from amax(v) (a softmax average never exceeds it), the probabilities at 256. Its softmax statistics feed
         FA3's bf16 backward, so training gradients never pass through fp8 (no scaling state is carried between
         steps). The cross-attention (512 text keys, ~1 % of the FLOPs) stays bf16 (fa3 where installed, else
         cudnn).
  fp8_full  (opt-in, Hopper, JAX 0.10-0.11) the same fp8 forward and cuDNN's fp8 backward (JAX's primitive, its
         scale operands placed as XLA reads them: JAX's own order gives garbage gradients, FP8_BWD_SCALE_ORDER).
         Stateless too: q, k, v, o re-quantised as the forward had them, dO from its amax, dS and dq/dk/dv from
         exact gradients of 128 strided query rows and key columns with two powers of two of headroom
         (`fp8_grad_amaxes`); where the kernel's own amax outputs show a tensor saturated, the backward runs
         again with scales from them (`fp8_backward_with_retry`). On an H200 the fp8 backward with delayed
         scales (the amaxes of a first call) ran 1.25-1.29x cuDNN bf16 fwd+bwd at 7e-2 gradient error (fp8:
         1.14-1.20x at 9e-3).
         The forward's output error is ~5 % (the e4m3 output), against 0.2 % for bf16.
  auto   (config value only, resolved by `resolve_backend`) fa3 where it is installed and the GPU is Hopper, else
         cudnn on GPUs, else xla. fp8 and fp8_full are never chosen automatically.

The DiT's ops take video-shaped tensors q [B, T, S, H, D] (T = latent frames of all views, S = tokens of a frame),
laid out as the activations are (`mesh.video_axes`: the context axis splits T, or S when it does not divide T), so
no sharded dimension is ever reshaped. With a mesh of more than one device both run inside `jax.shard_map`, since
cuDNN's own partitioner only allows batch/head sharding:

  self_attention   Ulysses (the reference's `minimal_a2a`): each device holds 1/cp of T (or S) for all H heads; an
                   all-to-all turns that into all T*S tokens of H/cp heads, attention runs on that local full
                   sequence (padded for cuDNN only here, locally), and a second all-to-all turns it back. The
                   global sequence is never padded, so no halo exchange is paid for odd lengths.
  group_cross_attention  queries stay local; each frame group's 512 text keys/values sit on the devices that
                   hold the group's frames (replicated over the context axis when it splits S).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from cosmos_jax.parallel import mesh as mesh_lib

CUDNN_SEQ_MULTIPLE = 64
BACKENDS = ("xla", "cudnn", "fa3", "fp8", "fp8_full")
FP8_BACKENDS = ("fp8", "fp8_full")  # self-attention in fp8 (cross-attention in bf16: fp8_partner)
HOPPER_BACKENDS = ("fa3", *FP8_BACKENDS)  # Hopper only, unpadded sequences, compiler_options
FA3_HEAD_DIMS = (128,)  # the head dims the published flash-attn3-jax wheels are built for (SM90)


class AttentionBackendError(ValueError):
    """An attention backend that cannot run here or on this shape; the message says which and why."""


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _xla_attention(q, k, v, kv_len: int | None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_len is not None and kv_len < k.shape[1]:
        valid = jnp.arange(k.shape[1]) < kv_len
        logits = jnp.where(valid[None, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _cudnn_attention(q, k, v, q_len: int, kv_len: int):
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise TypeError(f"cudnn attention needs bf16/fp16 inputs, got {q.dtype}; use attention_backend='xla' for fp32")
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        raise ValueError(f"cudnn attention needs head_dim a multiple of 8 and <= 256, got {q.shape[-1]}")
    b = q.shape[0]
    q_lens = kv_lens = None
    if q_len < q.shape[1] or kv_len < k.shape[1]:
        q_lens = jnp.full((b,), q_len, jnp.int32)
        kv_lens = jnp.full((b,), kv_len, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens,
                                        implementation="cudnn")


# ----------------------------------------------------------------------------------------------------------------
# FlashAttention-3


class Kernels(NamedTuple):
    """A flash-attention kernel pair: fwd(q, k, v, softmax_scale) -> (out [B,S,H,D], lse f32 [B,H,S]);
    bwd(dout, q, k, v, out, lse, softmax_scale) -> (dq, dk, dv)."""
    fwd: Callable
    bwd: Callable


@functools.lru_cache(maxsize=1)
def fa3_kernels() -> Kernels:
    """The flash-attn3-jax kernels (its forward/backward primitives, not its custom_vjp: see the module docstring)."""
    try:
        from flash_attn3_jax import flash as fa3
    except ImportError as e:
        raise AttentionBackendError(f"attention backend 'fa3' needs the flash-attn3-jax wheel (pip install -e "
                                    f"'.[gpu,fa3]', i.e. flash-attn3-jax==0.2.3): {e}") from None
    cfg = dict(is_causal=False, window_size=(-1, -1))
    return Kernels(fwd=lambda q, k, v, scale: tuple(fa3._flash_mha_fwd(q, k, v, softmax_scale=scale, **cfg)),
                   bwd=_fa3_backward)


FA3_BWD_TILE_HEIGHTS = (64, 80, 96, 128)  # kBlockM of FA3's SM80/SM86/SM90 backward kernels, any head_dim


def fa3_backward_rows(seqlen_q: int) -> int:
    """Rows per (batch, head) of the FA3 backward's softmax_d / softmax_lse_log2 buffers: the query length rounded
    up to every tile height the kernels use, so the kernel's own rounding never writes past them."""
    return max(_round_up(seqlen_q, m) for m in FA3_BWD_TILE_HEIGHTS)


def _fa3_backward(do, q, k, v, o, lse, scale):
    """The wheel's backward FFI target, called with correctly sized scratch outputs.

    The kernel writes its softmax_d / softmax_lse_log2 rows with a stride of the query length rounded up to its
    tile height (kBlockM: 80 for head_dim 128 on SM90, 64 causal), but the wheel's own lowering sizes those buffers
    rounded up to 128. Where the two differ (S = 256: 320 > 256; S = 4,096: 4,160 > 4,096) the kernel wrote past
    them and the gradients came out inf / wrong (seen on an H200: relative error 8.9e2 at 4,096 x 16); the DiT's
    training shapes (multiples of 3,600 tokens) happen to be multiples of 80. Sizing them for every tile height
    the kernels use removes the overrun.
    """
    b, sq, h, d = q.shape
    rows = fa3_backward_rows(sq)
    e = jnp.zeros((0,), jnp.int32)
    dq, dk, dv, _, _ = jax.ffi.ffi_call(
        "flash_mha_bwd", result_shape_dtypes=[
            jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b, h, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, h, rows), jnp.float32)],
        has_side_effect=False, input_layouts=[None] * 10, output_layouts=[None] * 5)(
        do, q, k, v, o, lse, e, e, e, e,
        max_seqlen_q_val=sq, max_seqlen_q_has_value=True, max_seqlen_k_val=k.shape[1], max_seqlen_k_has_value=True,
        softmax_scale_val=float(scale), softmax_scale_has_value=True, is_causal=False, window_size_left=-1,
        window_size_right=-1, softcap=0.0, deterministic=False, sm_margin=0)
    return dq, dk, dv


def xla_kernels() -> Kernels:
    """The same kernel contract in plain XLA (any device): the reference the fa3 wrapper is tested against on CPU."""
    def fwd(q, k, v, scale):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        lse = jax.nn.logsumexp(logits, axis=-1)
        probs = jnp.exp(logits - lse[..., None])
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.astype(q.dtype), lse

    def bwd(do, q, k, v, o, lse, scale):  # the flash-attention backward from the saved statistics
        f32 = jnp.float32
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32) * scale
        probs = jnp.exp(logits - lse[..., None])
        dv = jnp.einsum("bhqk,bqhd->bkhd", probs, do.astype(f32))
        dp = jnp.einsum("bqhd,bkhd->bhqk", do.astype(f32), v.astype(f32))
        delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(f32), o.astype(f32))
        ds = probs * (dp - delta[..., None]) * scale
        dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k.astype(f32))
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(f32))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    return Kernels(fwd, bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, site: str, kernels: Kernels):
    return kernels.fwd(q, k, v, 1.0 / math.sqrt(q.shape[-1]))[0]


def _flash_fwd(q, k, v, site, kernels):
    out, lse = kernels.fwd(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    out = checkpoint_name(out, f"{site}_kernel_out")
    lse = checkpoint_name(lse, f"{site}_kernel_lse")
    return out, (q, k, v, out, lse)


def _flash_bwd(site, kernels, res, dout):
    q, k, v, out, lse = res
    return tuple(kernels.bwd(dout, q, k, v, out, lse, 1.0 / math.sqrt(q.shape[-1])))


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------------------------
# fp8 forward (cuDNN) + bf16 backward (FA3)

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
    """cuDNN's fp8 flash-attention forward -> (out in q's dtype, softmax log-sum-exp f32 [B, H, S])."""
    from jax._src.cudnn import fused_attention_stablehlo as fa  # JAX has no public fp8 attention with statistics

    sq, sk, sv, so = fp8_input_scales(q, k, v)
    ss = jnp.float32(FP8_PROBS_SCALE)
    o8, _, _, stats = fa._dot_product_attention_fp8_fwd_p_wrapper.bind(
        fp8_quantize(q, sq), fp8_quantize(k, sk), fp8_quantize(v, sv), _fp8_scalar(1 / sq), _fp8_scalar(1 / sk), _fp8_scalar(1 / sv),
        _fp8_scalar(1 / ss), _fp8_scalar(ss), _fp8_scalar(so), scale=float(scale), use_causal_mask=False,
        layout=fa.AttentionLayout.BTNH.value, is_training=True)
    return (o8.astype(jnp.float32) / so).astype(q.dtype), stats.reshape(q.shape[0], q.shape[2], q.shape[1])


def _fp8_backward(do, q, k, v, o, lse, scale):
    fa3_kernels()  # registers the wheel's FFI targets; a clear error where it is not installed
    return _fa3_backward(do, q, k, v, o, lse, scale)


def fp8_kernels() -> Kernels:
    """The fp8 backend's kernel pair: cuDNN fp8 forward, FA3 bf16 backward from its statistics."""
    return Kernels(fwd=_cudnn_fp8_forward, bwd=_fp8_backward)


# ----------------------------------------------------------------------------------------------------------------
# fp8 backward (cuDNN), the fp8_full backend

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
FP8_GRAD_SAMPLES = 128
FP8_GRAD_MARGIN = 2
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


def fp8_grad_amaxes(do, q, k, v, o, lse, scale, samples: int = FP8_GRAD_SAMPLES):
    """Estimated amax of (dS * scale, dq, dk, dv) of one attention backward, dS = P o (dP - rowsum(dO o O)) (what
    cuDNN's fp8 backward scales with its "dP" scale: its amax output matched amax(dS * scale) on an H200): exact
    dq and dS rows for `samples` strided queries, exact dk, dv and dS columns for `samples` strided keys, from the
    forward's log-sum-exp. Products of the inputs' own dtype accumulate in f32 (bf16 inputs are not copied to f32);
    P and dS are rounded to that dtype before their second product, which moves an amax by < 1 %, far inside the
    scales' headroom. Heads are batched in groups whose [B, g, S, samples] f32 blocks fit FP8_GRAD_GROUP_ELEMENTS
    (all heads at once at the DiT's one-GPU 1-2 view lengths; a loop over groups beyond). f32 [4]."""
    f32 = jnp.float32
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


def fp8_backward_scales(do, q, k, v, o, lse, scale) -> dict:
    """Scales of one fp8 backward call: q, k, v, o and the probabilities as the forward had them (so the fp8 values
    are the forward's), dO from its amax, dS and dq/dk/dv from `fp8_grad_amaxes` with FP8_GRAD_MARGIN. Names as in
    FP8_BWD_SCALE_ORDER (scale_*: x * scale -> fp8)."""
    sq, sk, sv, so = fp8_input_scales(q, k, v)
    est = fp8_grad_amaxes(do, q, k, v, o, lse, scale)  # one estimate (a loop XLA would not merge if repeated)
    return {"q": sq, "k": sk, "v": sv, "o": so, "s": jnp.float32(FP8_PROBS_SCALE), "do": fp8_scale(_amax(do)),
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


def _cudnn_fp8_backward(do, q, k, v, o, lse, scale):
    """cuDNN's fp8 flash-attention backward (JAX's primitive, its scale operands placed for XLA) -> bf16 dq, dk, dv.
    q, k, v, o are re-quantised with the forward's power-of-two scales, which reproduces the forward's fp8 values
    exactly; the forward's log-sum-exp is the kernel's softmax statistics. Saturation is caught from the kernel's
    amax outputs (`fp8_backward_with_retry`)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    sc = fp8_backward_scales(do, q, k, v, o, lse, scale)
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


def fp8_emulation_kernels() -> Kernels:
    """The fp8 backend's arithmetic in plain XLA (any device): q, k, v and the output rounded through e4m3 with the
    same scales, exact attention in between, the exact backward. CPU tests check the scaling against it; it does
    not model the kernel's own rounding of the probabilities."""
    exact = xla_kernels()

    def fwd(q, k, v, scale):
        sq, sk, sv, so = fp8_input_scales(q, k, v)
        rt = [(fp8_quantize(x, s).astype(jnp.float32) / s).astype(x.dtype) for x, s in ((q, sq), (k, sk), (v, sv))]
        out, lse = exact.fwd(*rt, scale)
        return (fp8_quantize(out, so).astype(jnp.float32) / so).astype(q.dtype), lse

    return Kernels(fwd=fwd, bwd=exact.bwd)


def fp8_full_emulation_kernels() -> Kernels:
    """The fp8_full backend's arithmetic in plain XLA: the fp8 forward's emulation, and a backward that rounds
    through e4m3 where cuDNN's fp8 backward holds fp8 tensors (q, k, v, o, dO, the probabilities, dS, and its dq,
    dk, dv outputs) with the scales `fp8_backward_scales` picks. CPU tests check the scaling against it."""
    f32 = jnp.float32

    def rt(x, s):  # through e4m3 and back
        return fp8_quantize(x, s).astype(f32) / s

    def bwd(do, q, k, v, o, lse, scale):
        sc = fp8_backward_scales(do, q, k, v, o, lse, scale)
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

    return Kernels(fwd=fp8_emulation_kernels().fwd, bwd=bwd)


FP8_SEQ_MULTIPLE = 64


def check_fp8_shape(q, k) -> None:
    check_fa3_shape(q)
    for name, x in (("query", q), ("key", k)):
        if x.shape[1] % FP8_SEQ_MULTIPLE:
            raise AttentionBackendError(
                f"fp8 attention: {name} length {x.shape[1]} is not a multiple of {FP8_SEQ_MULTIPLE} (cuDNN's fp8 "
                "attention takes no padding mask); use attention_backend='fa3' for this shape")


def fp8_partner() -> str:
    """The bf16 backend the fp8 backend runs its cross-attention with: fa3 where installed, else cudnn."""
    try:
        fa3_kernels()
        return "fa3"
    except AttentionBackendError:
        return "cudnn"


def check_fa3_shape(q) -> None:
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise AttentionBackendError(f"fa3 attention needs bf16/fp16 inputs, got {q.dtype}; use "
                                    "attention_backend='xla' for fp32")
    if q.shape[-1] not in FA3_HEAD_DIMS:
        raise AttentionBackendError(f"fa3 attention: head_dim {q.shape[-1]} is not built into the flash-attn3-jax "
                                    f"wheel (supported: {FA3_HEAD_DIMS}); use attention_backend='cudnn'")


def flash_attention(q, k, v, *, site: str, kernels: Kernels | None = None):
    """FlashAttention-3 on one device (no padding needed); `kernels` overrides the kernel pair (tests)."""
    if kernels is None:
        check_fa3_shape(q)
        kernels = fa3_kernels()
    return _flash(q, k, v, site, kernels)


def _is_hopper(device) -> bool:
    return getattr(device, "platform", "") == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def resolve_backend(name: str, devices=None) -> str:
    """A config's attention backend -> one of BACKENDS. 'auto': fa3 when the wheel imports and every device is a
    Hopper GPU, else cudnn on GPUs, else xla. 'fa3' is checked here, so a run that cannot use it stops before
    compiling with a message naming the reason."""
    devices = jax.devices() if devices is None else list(devices)
    gpu = bool(devices) and all(getattr(d, "platform", "") == "gpu" for d in devices)
    if name == "auto":
        if gpu and all(_is_hopper(d) for d in devices):
            try:
                fa3_kernels()
                return "fa3"
            except AttentionBackendError:
                return "cudnn"
        return "cudnn" if gpu else "xla"
    if name not in BACKENDS:
        raise AttentionBackendError(f"attention_backend {name!r}: expected 'auto' or one of {BACKENDS}")
    if name in HOPPER_BACKENDS:
        if not (gpu and all(_is_hopper(d) for d in devices)):
            kinds = sorted({getattr(d, "device_kind", d.platform) for d in devices})
            raise AttentionBackendError(f"attention_backend {name!r} needs Hopper GPUs (SM90); this run has {kinds}")
        if name == "fa3":
            fa3_kernels()
    if name == "fp8_full":
        check_fp8_backward_jax()
    return name


def check_fp8_backward_jax(version: str | None = None) -> None:
    """fp8_full binds JAX's fp8 backward primitive with its scale operands re-placed for XLA (FP8_BWD_SCALE_ORDER);
    that is only right for the JAX versions it was checked against."""
    version = jax.__version__ if version is None else version
    if not version.startswith(FP8_BWD_JAX_VERSIONS):
        raise AttentionBackendError(
            f"attention_backend 'fp8_full' was checked against JAX {', '.join(v + 'x' for v in FP8_BWD_JAX_VERSIONS)}"
            f" only (its fp8 backward re-orders JAX's scale operands for XLA), this is JAX {version}: run "
            "bench/bench_fp8.py to check the gradients, then add the version to FP8_BWD_JAX_VERSIONS; or use 'fp8'")


def compiler_options(backend: str) -> dict:
    """XLA options a program using this backend must be compiled with (pass to `jax.jit(compiler_options=...)`).

    fa3: XLA's GPU dynamic-slice fusion rewrites a custom call whose output is written into a stacked buffer (the
    scanned layers' saved residuals) into a fusion that writes it in place, but when the output has other users too
    it keeps the original call as well, so every FA3 forward ran twice in the training step's forward loop (seen in
    the optimised HLO of the 2B net: 8 forward calls for 4 call sites; profile: 2.75 s of forward kernels vs 1.44 s
    with cuDNN). Switching the rewrite off keeps one call per site.
    """
    return {"xla_gpu_enable_dynamic_slice_fusion": False} if backend in HOPPER_BACKENDS else {}


def _pad_seq(x, length: int):
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def local_attention(q, k, v, *, backend: str, q_len: int | None = None, kv_len: int | None = None,
                    site: str = "attn"):
    """Attention on one device, q [B, Sq, H, D]. `q_len`/`kv_len`: true lengths when the tail of q / k,v is padding.
    `site` names the fa3/fp8 kernels' saved tensors for remat policies (`self_attn`, `cross_attn`); the fp8 backend
    runs only `self_attn` in fp8."""
    q_len = q.shape[1] if q_len is None else q_len
    kv_len = k.shape[1] if kv_len is None else kv_len
    if backend in FP8_BACKENDS and site != "self_attn":
        backend = fp8_partner()  # the cross-attention stays bf16
    if backend in HOPPER_BACKENDS:
        if q_len < q.shape[1] or kv_len < k.shape[1]:
            raise AttentionBackendError(f"{backend} attention takes unpadded sequences (no q_len / kv_len)")
        if backend == "fa3":
            return flash_attention(q, k, v, site=site)
        check_fp8_shape(q, k)
        return _flash(q, k, v, site, fp8_kernels() if backend == "fp8" else fp8_full_kernels())
    if backend == "xla":
        return _xla_attention(q, k, v, kv_len)
    if backend == "cudnn":
        sq, skv = _round_up(q.shape[1], CUDNN_SEQ_MULTIPLE), _round_up(k.shape[1], CUDNN_SEQ_MULTIPLE)
        out = _cudnn_attention(_pad_seq(q, sq), _pad_seq(k, skv), _pad_seq(v, skv), q_len, kv_len)
        return out[:, : q.shape[1]]
    raise AttentionBackendError(f"unknown attention backend {backend!r} (expected one of {BACKENDS})")


def attention(q, k, v, *, backend: str):
    """Attention where q, k, v are [B, S, H, D] on one device (or sharded over batch/heads only)."""
    return local_attention(q, k, v, backend=backend)


def _sharded_mesh():
    mesh = mesh_lib.current_mesh()
    return mesh if mesh is not None and mesh.size > 1 else None


def _video_specs(q_shape):
    """(spec of a [B, T, S, H, D] tensor, index of the axis the context axis splits, its mesh axes)."""
    b, t, s = q_shape[:3]
    axes = mesh_lib.video_axes(t, s, b)
    spec = mesh_lib.activation_spec(axes + ("activation_heads", None), q_shape)
    seq_axis = 1 if axes[1] is not None else 2
    return spec, seq_axis, mesh_lib.logical_mesh_axes(axes[seq_axis])


def self_attention(q, k, v, *, backend: str):
    """Full self-attention over all T*S tokens of q, k, v [B, T, S, H, D]; Ulysses context parallel on a mesh.

    The tokens are ordered frame-major (t, s) as in the reference's flattened `(T H W)` sequence.
    """

    def attend(q, k, v):  # the full sequence of some heads, on one device
        bl, tl, sl, hl, d = q.shape
        flat = [z.reshape(bl, tl * sl, hl, d) for z in (q, k, v)]
        return local_attention(*flat, backend=backend, site="self_attn").reshape(q.shape)

    if _sharded_mesh() is None:
        return attend(q, k, v)
    spec, seq_axis, ctx_axes = _video_specs(q.shape)
    cp = mesh_lib.logical_axis_size("activation_length" if seq_axis == 1 else "activation_frame_tokens")
    local_heads = q.shape[3] // mesh_lib.logical_axis_size("activation_heads")
    if local_heads % cp:
        raise ValueError(f"Ulysses context parallelism needs num_heads ({q.shape[3]}, {local_heads} per tensor "
                         f"shard) divisible by the context axis ({cp})")
    axis_name = ctx_axes[0] if len(ctx_axes) == 1 else ctx_axes

    @functools.partial(jax.shard_map, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    def ulysses(q_l, k_l, v_l):
        if cp == 1:
            return attend(q_l, k_l, v_l)
        # [B, T/cp, S, H, D] (or [B, T, S/cp, H, D]) -> [B, T, S, H/cp, D]: split heads, gather the sharded axis.
        to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=3, concat_axis=seq_axis,
                                     tiled=True)
        out = attend(to_heads(q_l), to_heads(k_l), to_heads(v_l))
        return jax.lax.all_to_all(out, axis_name=axis_name, split_axis=seq_axis, concat_axis=3, tiled=True)

    return ulysses(q, k, v)


def group_cross_attention(q, k, v, *, backend: str):
    """Cross-attention where consecutive frame groups attend to their own keys.

    q [B, T, S, H, D]; k, v [B, G, M, H, D] with G dividing T: frames [i*T/G, (i+1)*T/G) attend to the M keys of
    group i. On a mesh the groups are split like the frames (so a device's frames and their keys stay together;
    G must then be divisible by the context size when it splits T), or replicated when the context axis splits S.
    """
    b, t, s, _, _ = q.shape
    n_groups = k.shape[1]
    if t % n_groups:
        raise ValueError(f"{n_groups} key groups do not divide the {t} frames of the queries")

    def attend(q, k, v):
        bl, tl, sl, hl, d = q.shape
        gl, m = k.shape[1], k.shape[2]
        out = local_attention(q.reshape(bl * gl, (tl // gl) * sl, hl, d), k.reshape(bl * gl, m, hl, d),
                              v.reshape(bl * gl, m, hl, d), backend=backend, site="cross_attn")
        return out.reshape(q.shape)

    if _sharded_mesh() is None:
        return attend(q, k, v)
    q_spec, _, _ = _video_specs(q.shape)
    kv_spec = P(q_spec[0], q_spec[1], None, q_spec[3], None)  # groups split like the frames; keys never split
    if q_spec[1] is not None:
        mesh_lib.activation_spec((None, "activation_length"), k.shape[:2])  # the groups must split as the frames do
    return jax.shard_map(attend, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(q, k, v)
