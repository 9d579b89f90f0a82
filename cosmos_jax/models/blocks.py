"""Building blocks of the DiT: norms, adaLN-LoRA modulation, attentions, MLP, the transformer block.

Reference: `Block`, `Attention`, `GPT2FeedForward` (predict2/networks/minimal_v4_dit.py), `MultiViewCrossAttention`
(predict2_multiview/networks/multiview_dit.py), `ControlAwareDiTBlock` / `ControlEncoderDiTBlock`
(transfer2/networks/minimal_v4_lvg_dit_control_vace.py).

Activations inside a block are `x_B_T_S_D`: T = all latent frames of all views (view-major, V*T), S = H*W tokens of a
frame after patchify. Per-frame adaLN modulations broadcast over S; self-attention attends over all (T S) tokens as
one sequence. Context parallelism shards T, or S when it does not divide T (`x_axes`); q, k, v keep the
[B, T, S, H, Dh] layout up to the attention op, so no sharded axis is ever reshaped.
Weights are fp32 (`param_dtype`); matmuls run in `dtype` (bf16 in production). The timestep embedding and the adaLN
modulations run in fp32 as the reference's `use_wan_fp32_strategy` does; RoPE is applied in fp32 too.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.ops import attention as attn_ops
from cosmos_jax.parallel.mesh import constrain, logical_axis_size, video_axes

EPS = 1e-6


def x_axes(x_B_T_S_D) -> tuple[str | None, ...]:
    """Logical axes of an x_B_T_S_D activation under the current mesh (an error if it cannot be sharded)."""
    b, t, s, _ = x_B_T_S_D.shape
    return video_axes(t, s, b) + ("activation_embed",)


def trunc_normal(fan_in: int):
    """Reference init: trunc_normal(std=1/sqrt(fan_in), a=-3std, b=3std)."""
    return nn.initializers.truncated_normal(stddev=1.0 / math.sqrt(fan_in), lower=-3.0, upper=3.0)


def dense(features: int, axes: tuple[str, str], *, fan_in: int, use_bias: bool = False, zero_init: bool = False,
          dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, name: str | None = None) -> nn.Dense:
    kernel_init = nn.initializers.zeros_init() if zero_init else trunc_normal(fan_in)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


class RMSNorm(nn.Module):
    """TE RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, computed in fp32."""
    eps: float = EPS
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                            (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * weight.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x, eps: float = EPS):
    """LayerNorm without affine parameters (elementwise_affine=False), statistics in fp32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + eps)


def modulate_frames(x_B_T_S_D, shift_B_Tt_D, scale_B_Tt_D):
    """LN(x) * (1 + scale) + shift with per-frame (or per-sample, Tt=1) modulation, output in x's dtype."""
    y = layer_norm(x_B_T_S_D) * (1.0 + scale_B_Tt_D[:, :, None, :]) + shift_B_Tt_D[:, :, None, :]
    return y.astype(x_B_T_S_D.dtype)


def gate_frames(gate_B_Tt_D, y_B_T_S_D):
    return gate_B_Tt_D[:, :, None, :].astype(y_B_T_S_D.dtype) * y_B_T_S_D


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(D, lora) -> Linear(lora, n*D), plus the shared adaLN-LoRA term; fp32."""
    cfg: DiTConfig
    n_chunks: int = 3

    @nn.compact
    def __call__(self, emb_B_Tt_D, adaln_lora_B_Tt_3D):
        cfg = self.cfg
        d = cfg.model_channels
        h = dense(cfg.adaln_lora_dim, ("embed", "lora"), fan_in=d, name="down")(nn.silu(emb_B_Tt_D))
        h = dense(self.n_chunks * d, ("lora", "modulation"), fan_in=cfg.adaln_lora_dim, zero_init=True, name="up")(h)
        h = h + adaln_lora_B_Tt_3D[..., : self.n_chunks * d]
        # small per-frame tensors: batch-sharded, width whole, so that the split below stays local (the up weight's
        # FSDP-sharded output width would otherwise be split across shard boundaries)
        h = constrain(h, ("activation_batch", "activation_frames", "activation_embed"))
        return jnp.split(h, self.n_chunks, axis=-1)


def apply_rope(x_B_T_S_H_D, cos_T_S_D, sin_T_S_D):
    """Non-interleaved rotate-half RoPE (TE `apply_rotary_pos_emb`, bshd), in fp32."""
    xf = x_B_T_S_H_D.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return xf * cos_T_S_D[None, :, :, None, :] + rotated * sin_T_S_D[None, :, :, None, :]


class SelfAttention(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x_B_T_S_D, rope_cos_T_S_D, rope_sin_T_S_D):
        cfg = self.cfg
        b, t, s, d = x_B_T_S_D.shape
        h, hd = cfg.num_heads, cfg.head_dim
        kw = dict(fan_in=d, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        q = dense(d, ("embed", "heads"), name="q_proj", **kw)(x_B_T_S_D).reshape(b, t, s, h, hd)
        k = dense(d, ("embed", "heads"), name="k_proj", **kw)(x_B_T_S_D).reshape(b, t, s, h, hd)
        v = dense(d, ("embed", "heads"), name="v_proj", **kw)(x_B_T_S_D).reshape(b, t, s, h, hd)
        q = RMSNorm(param_dtype=cfg.param_dtype, name="q_norm")(q)
        k = RMSNorm(param_dtype=cfg.param_dtype, name="k_norm")(k)
        q = apply_rope(q, rope_cos_T_S_D, rope_sin_T_S_D).astype(cfg.dtype)
        k = apply_rope(k, rope_cos_T_S_D, rope_sin_T_S_D).astype(cfg.dtype)
        q, k, v = (checkpoint_name(z, "self_attn_qkv") for z in (q, k, v))
        o = attn_ops.self_attention(q, k, v, backend=cfg.attention_backend)
        o = checkpoint_name(o, "self_attn_out")
        return dense(d, ("heads", "embed"), name="output_proj", fan_in=d, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype)(o.reshape(b, t, s, d))


class MultiViewCrossAttention(nn.Module):
    """Cross-attention where the frames of view v attend only to text tokens [512 v, 512 (v+1)).

    The reference regroups `B (V L) D -> (V B) L D` with V = context_len // 512. We keep the frame axis intact (it
    may be sharded under context parallelism) and group g consecutive frames of one view, g = gcd(frames of a view,
    frames per device), so the attention is a batched (B*T/g) call with the 512 keys of the group's view; without
    frame sharding the groups are the views, as in the reference.
    """
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x_B_T_S_D, context_B_M_Dc):
        cfg = self.cfg
        b, t, s, d = x_B_T_S_D.shape
        m, dc = context_B_M_Dc.shape[1:]
        h, hd = cfg.num_heads, cfg.head_dim
        per_view = cfg.crossattn_tokens_per_view
        n_ctx_views = m // per_view
        if n_ctx_views == 0 or m % per_view or t % n_ctx_views:
            raise ValueError(f"cross-attention context of {m} tokens must be a multiple of {per_view} tokens per view "
                             f"whose view count divides the {t} latent frames")
        q = dense(d, ("embed", "heads"), name="q_proj", fan_in=d, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype)(x_B_T_S_D)
        k = dense(d, ("kv_embed", "heads"), name="k_proj", fan_in=dc, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype)(context_B_M_Dc)
        v = dense(d, ("kv_embed", "heads"), name="v_proj", fan_in=dc, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype)(context_B_M_Dc)
        q = RMSNorm(param_dtype=cfg.param_dtype, name="q_norm")(q.reshape(b, t, s, h, hd))
        k = RMSNorm(param_dtype=cfg.param_dtype, name="k_norm")(k.reshape(b, n_ctx_views, per_view, h, hd))
        v = v.reshape(b, n_ctx_views, per_view, h, hd)
        frames_per_view = t // n_ctx_views
        t_axis = video_axes(t, s, b)[1]
        group = math.gcd(frames_per_view, t // logical_axis_size(t_axis) if t_axis else t)
        group_view = np.arange(t // group) * group // frames_per_view
        if t // group != n_ctx_views:  # groups are smaller than views: each group gets its view's keys
            k, v = jnp.take(k, group_view, axis=1), jnp.take(v, group_view, axis=1)
        o = attn_ops.group_cross_attention(q, k, v, backend=cfg.attention_backend)
        o = checkpoint_name(o, "cross_attn_out")
        o = dense(d, ("heads", "embed"), name="output_proj", fan_in=d, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype)(o.reshape(b, t, s, d))
        return o


class MLP(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        hdn = dense(cfg.mlp_hidden, ("embed", "mlp"), name="layer1", fan_in=cfg.model_channels, dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype)(x)
        hdn = checkpoint_name(nn.gelu(hdn, approximate=False), "mlp_hidden")
        return dense(cfg.model_channels, ("mlp", "embed"), name="layer2", fan_in=cfg.mlp_hidden, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype)(hdn)


class DiTBlock(nn.Module):
    """Self-attention, per-view cross-attention and MLP, each with its own LN + adaLN-LoRA modulation and gate.

    `with_after_proj`: a control-branch block (`ControlEncoderDiTBlock`), which also returns its hint
    `after_proj(x)`.
    """
    cfg: DiTConfig
    with_after_proj: bool = False

    @nn.compact
    def __call__(self, x_B_T_S_D, emb_B_Tt_D, adaln_lora_B_Tt_3D, context_B_M_Dc, rope_cos_T_S_D, rope_sin_T_S_D):
        cfg = self.cfg
        x = constrain(x_B_T_S_D, x_axes(x_B_T_S_D))
        shift, scale, gate = AdaLNModulation(cfg, name="adaln_modulation_self_attn")(emb_B_Tt_D, adaln_lora_B_Tt_3D)
        y = SelfAttention(cfg, name="self_attn")(modulate_frames(x, shift, scale), rope_cos_T_S_D, rope_sin_T_S_D)
        x = x + gate_frames(gate, y)

        shift, scale, gate = AdaLNModulation(cfg, name="adaln_modulation_cross_attn")(emb_B_Tt_D, adaln_lora_B_Tt_3D)
        y = MultiViewCrossAttention(cfg, name="cross_attn")(modulate_frames(x, shift, scale), context_B_M_Dc)
        x = x + gate_frames(gate, y)

        shift, scale, gate = AdaLNModulation(cfg, name="adaln_modulation_mlp")(emb_B_Tt_D, adaln_lora_B_Tt_3D)
        y = MLP(cfg, name="mlp")(modulate_frames(x, shift, scale))
        x = constrain(x + gate_frames(gate, y), x_axes(x))
        if not self.with_after_proj:
            return x
        hint = dense(cfg.model_channels, ("embed", "embed_out"), name="after_proj", fan_in=cfg.model_channels,
                     use_bias=True, zero_init=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype)(x)
        return x, constrain(hint, x_axes(hint))
