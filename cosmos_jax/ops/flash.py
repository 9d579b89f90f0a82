"""The flash-attention kernel contract and its kernels: a `Kernels` pair (forward returning the output and the
softmax log-sum-exp, backward from them) wrapped in one `jax.custom_vjp` whose forward names what it saves, so remat
policies can keep it.

FlashAttention-3 (Hopper, bf16/fp16, head_dim 128) comes from the `flash-attn3-jax` wheel's XLA FFI kernels, any
sequence length. Its forward and backward kernels are wrapped here rather than through the wheel's own custom_vjp,
whose internals a remat policy cannot see: our forward names the kernel's output and log-sum-exp
(`<site>_kernel_out`, `<site>_kernel_lse`, site `self_attn` or `cross_attn`), so a policy that saves those names
keeps the backward from rerunning the attention forward. The backward kernel is called through the wheel's FFI
target with scratch buffers sized for every tile height (`fa3_backward`: the wheel's own lowering under-sizes them
for some lengths). `xla_kernels` is the same contract in plain XLA, what CPU tests put in the kernels' place.

Layout: q [B, Sq, H, D], k/v [B, Skv, H, D], lse f32 [B, H, Sq].
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

FA3_HEAD_DIMS = (128,)  # the head dims the published flash-attn3-jax wheels are built for (SM90)


class AttentionBackendError(ValueError):
    """An attention backend that cannot run here or on this shape; the message says which and why."""


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m

class Kernels(NamedTuple):
    """A flash-attention kernel pair: fwd(q, k, v, softmax_scale) -> (out [B,S,H,D], lse f32 [B,H,S], *aux);
    bwd(dout, q, k, v, out, lse, softmax_scale, *aux) -> (dq, dk, dv). `aux`: what else the backward needs from
    the forward, small f32 arrays (fp8_full: the forward's amax of the probabilities), named `<site>_kernel_aux`
    like the output and the log-sum-exp; most kernels have none."""
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
                   bwd=fa3_backward)


FA3_BWD_TILE_HEIGHTS = (64, 80, 96, 128)  # kBlockM of FA3's SM80/SM86/SM90 backward kernels, any head_dim


def fa3_backward_rows(seqlen_q: int) -> int:
    """Rows per (batch, head) of the FA3 backward's softmax_d / softmax_lse_log2 buffers: the query length rounded
    up to every tile height the kernels use, so the kernel's own rounding never writes past them."""
    return max(round_up(seqlen_q, m) for m in FA3_BWD_TILE_HEIGHTS)


def fa3_backward(do, q, k, v, o, lse, scale):
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
    out, lse, *aux = kernels.fwd(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    out = checkpoint_name(out, f"{site}_kernel_out")
    lse = checkpoint_name(lse, f"{site}_kernel_lse")
    aux = tuple(checkpoint_name(a, f"{site}_kernel_aux") for a in aux)
    return out, (q, k, v, out, lse, aux)


def _flash_bwd(site, kernels, res, dout):
    q, k, v, out, lse, aux = res
    return tuple(kernels.bwd(dout, q, k, v, out, lse, 1.0 / math.sqrt(q.shape[-1]), *aux))


_flash.defvjp(_flash_fwd, _flash_bwd)


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

