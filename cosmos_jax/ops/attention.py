"""One attention op with named backends, and Ulysses context parallelism around it.

Layout everywhere: q [B, Sq, H, D], k/v [B, Skv, H, D] (the reference's "bshd"). Softmax scale 1/sqrt(D), no mask
(the reference uses `attn_mask_type="no_mask"`); padding that we add ourselves is excluded through sequence lengths.

Backends
  xla    plain einsum softmax in fp32 accumulation; any device, any length (CPU tests, parity).
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention, GPU, bf16/fp16 only).
         cuDNN's backward rejects odd lengths and is fastest on multiples of 64, so sequences are padded to a
         multiple of 64 and the true lengths are passed as `query_seq_lengths` / `key_value_seq_lengths`.

Context parallelism (Ulysses, as the reference's `minimal_a2a`): inside `jax.shard_map` over the `context` mesh
axis each device holds L/cp tokens of all H heads; an all-to-all turns that into all L tokens of H/cp heads, the
local attention runs, and a second all-to-all turns it back. cuDNN's own partitioner only allows batch/head
sharding, which is exactly what each device sees inside the shard_map.
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
    """Attention on one device. `q_len`/`kv_len`: true lengths when the tail of q / k,v is padding."""
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
    """Attention where q, k, v are [B, S, H, D]; no context parallelism (cross-attention, single device)."""
    return local_attention(q, k, v, backend=backend)


def self_attention(q, k, v, *, backend: str, context_axis: str = "context"):
    """Full self-attention over the token axis, context-parallel (Ulysses) when a `context` mesh axis > 1 is set.

    q, k, v: [B, L, H, D] global arrays (inside jit, sharded however the caller likes).
    """
    mesh = mesh_lib.current_mesh()
    cp = mesh_lib.mesh_axis_size(context_axis)
    if cp == 1:
        return local_attention(q, k, v, backend=backend)
    b, length, heads, _ = q.shape
    if heads % cp:
        raise ValueError(f"Ulysses context parallelism needs num_heads ({heads}) divisible by the context axis ({cp})")
    # Pad the token axis so it splits evenly over the context axis (and, for cuDNN, to a multiple of 64 after the
    # all-to-all). Padded keys are masked through kv_len; padded queries are sliced away.
    multiple = cp * (CUDNN_SEQ_MULTIPLE if backend == "cudnn" else 1)
    padded = _round_up(length, multiple)
    q, k, v = (_pad_seq(t, padded) for t in (q, k, v))

    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and b % mesh.shape[a] == 0)
    batch_spec = batch_axes if batch_axes else None
    spec = P(batch_spec, context_axis, None, None)

    @functools.partial(jax.shard_map, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    def _ulysses(q_l, k_l, v_l):
        # [B, L/cp, H, D] -> [B, L, H/cp, D]: split heads over devices, gather the sequence.
        seq_to_heads = functools.partial(jax.lax.all_to_all, axis_name=context_axis, split_axis=2, concat_axis=1,
                                         tiled=True)
        out = local_attention(seq_to_heads(q_l), seq_to_heads(k_l), seq_to_heads(v_l), backend=backend,
                              q_len=length, kv_len=length)
        return jax.lax.all_to_all(out, axis_name=context_axis, split_axis=1, concat_axis=2, tiled=True)

    out = _ulysses(q, k, v)
    return out[:, :length]
