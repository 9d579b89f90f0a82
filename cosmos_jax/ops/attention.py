"""One attention op with named backends, and Ulysses context parallelism around it.

Layout of the local op: q [B, Sq, H, D], k/v [B, Skv, H, D] (the reference's "bshd"). Softmax scale 1/sqrt(D), no
mask (the reference uses `attn_mask_type="no_mask"`); padding that we add ourselves is excluded through sequence
lengths.

Backends
  xla    plain einsum softmax in fp32 accumulation; any device, any length (CPU tests, parity).
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention, GPU, bf16/fp16 only).
         cuDNN's backward rejects odd lengths and is fastest on multiples of 64, so sequences are padded to a
         multiple of 64 and the true lengths are passed as `query_seq_lengths` / `key_value_seq_lengths`.

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

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cosmos_jax.parallel import mesh as mesh_lib

CUDNN_SEQ_MULTIPLE = 64


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


def _pad_seq(x, length: int):
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def local_attention(q, k, v, *, backend: str, q_len: int | None = None, kv_len: int | None = None):
    """Attention on one device, q [B, Sq, H, D]. `q_len`/`kv_len`: true lengths when the tail of q / k,v is padding."""
    q_len = q.shape[1] if q_len is None else q_len
    kv_len = k.shape[1] if kv_len is None else kv_len
    if backend == "xla":
        return _xla_attention(q, k, v, kv_len)
    if backend == "cudnn":
        sq, skv = _round_up(q.shape[1], CUDNN_SEQ_MULTIPLE), _round_up(k.shape[1], CUDNN_SEQ_MULTIPLE)
        out = _cudnn_attention(_pad_seq(q, sq), _pad_seq(k, skv), _pad_seq(v, skv), q_len, kv_len)
        return out[:, : q.shape[1]]
    raise ValueError(f"unknown attention backend {backend!r} (expected 'xla' or 'cudnn')")


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
        return local_attention(*flat, backend=backend).reshape(q.shape)

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
                              v.reshape(bl * gl, m, hl, d), backend=backend)
        return out.reshape(q.shape)

    if _sharded_mesh() is None:
        return attend(q, k, v)
    q_spec, _, _ = _video_specs(q.shape)
    kv_spec = P(q_spec[0], q_spec[1], None, q_spec[3], None)  # groups split like the frames; keys never split
    if q_spec[1] is not None:
        mesh_lib.activation_spec((None, "activation_length"), k.shape[:2])  # the groups must split as the frames do
    return jax.shard_map(attend, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(q, k, v)
