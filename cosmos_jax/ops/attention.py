"""One attention op with named backends, and Ulysses context parallelism around it.

Layout of the local op: q [B, Sq, H, D], k/v [B, Skv, H, D] (the reference's "bshd"). Softmax scale 1/sqrt(D), no
mask (the reference uses `attn_mask_type="no_mask"`); padding that we add ourselves is excluded through sequence
lengths.

Backends
  xla    plain einsum softmax in fp32 accumulation; any device, any length (CPU tests, parity).
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention, GPU, bf16/fp16 only).
         cuDNN's backward rejects odd lengths and is fastest on multiples of 64, so sequences are padded to a
         multiple of 64 and the true lengths are passed as `query_seq_lengths` / `key_value_seq_lengths`.
  fa3    FlashAttention-3 (Hopper, bf16/fp16, head_dim 128) through the `flash-attn3-jax` wheel, any sequence
         length, wrapped so remat policies can save its output and log-sum-exp (`ops/flash.py`). A jitted program
         that uses it (or fp8 / fp8_full) must be compiled with `compiler_options(backend)` (the trainer does), else
         XLA duplicates every forward whose output a scanned gradient saves.
  fp8    (opt-in, Hopper) self-attention forward in fp8 through cuDNN's fp8 flash attention, FA3's bf16 backward
         (`ops/fp8_attention.py`). The cross-attention (512 text keys, ~1 % of the FLOPs) stays bf16 (fa3 where
         installed, else cudnn: `fp8_partner`).
  fp8_full  (opt-in, Hopper, JAX 0.10-0.11) the same fp8 forward and cuDNN's fp8 backward, stateless per-call
         scaling (`ops/fp8_attention.py`).
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

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cosmos_jax.ops import flash
from cosmos_jax.ops import fp8_attention as fp8
from cosmos_jax.parallel import mesh as mesh_lib

CUDNN_SEQ_MULTIPLE = 64
BACKENDS = ("xla", "cudnn", "fa3", "fp8", "fp8_full")
FP8_BACKENDS = ("fp8", "fp8_full")  # self-attention in fp8 (cross-attention in bf16: fp8_partner)
HOPPER_BACKENDS = ("fa3", *FP8_BACKENDS)  # Hopper only, unpadded sequences, compiler_options

AttentionBackendError = flash.AttentionBackendError  # re-exported: the error callers catch


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


def fp8_partner() -> str:
    """The bf16 backend the fp8 backend runs its cross-attention with: fa3 where installed, else cudnn."""
    try:
        flash.fa3_kernels()
        return "fa3"
    except AttentionBackendError:
        return "cudnn"



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
                flash.fa3_kernels()
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
            flash.fa3_kernels()
    if name == "fp8_full":
        fp8.check_fp8_backward_jax()
    return name



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
            return flash.flash_attention(q, k, v, site=site)
        fp8.check_fp8_shape(q, k)
        kernels = fp8.fp8_kernels() if backend == "fp8" else fp8.fp8_full_kernels()
        return flash.flash_attention(q, k, v, site=site, kernels=kernels)
    if backend == "xla":
        return _xla_attention(q, k, v, kv_len)
    if backend == "cudnn":
        sq, skv = flash.round_up(q.shape[1], CUDNN_SEQ_MULTIPLE), flash.round_up(k.shape[1], CUDNN_SEQ_MULTIPLE)
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
