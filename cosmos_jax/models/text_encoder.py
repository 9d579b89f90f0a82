"""The text encoder: the language model of Qwen2.5-VL (Cosmos-Reason1.1-7B), text-only, returning every hidden state.

Reference: `cosmos_transfer2/_src/reason1/networks/qwen2_5_vl.py` (`Qwen2_5_VLModel`, `Qwen2_5_VLDecoderLayer`,
`Qwen2_5_VLSdpaAttention`, `Qwen2RMSNorm`, `Qwen2MLP`), called by `TextEncoder.compute_text_embeddings_online`
(`predict2/text_encoders/text_encoder.py`) with token ids only: no attention mask, so attention is plain causal over
all 512 positions (pads see the caption, the caption never sees pads) and positions are 0..511. For text the
multimodal RoPE's three position streams are equal, so it is ordinary RoPE.

Layer weights are stacked on a leading `layers` axis (nn.scan: one compiled layer), or, with `scan_layers=False`,
kept per layer (`layers_0` ...: no per-step slice of the stacked weights, faster at small batch; `unstack_layers`).
q/k/v and gate/up projections are stored fused (one matmul each); `weights/hf_io.py` fuses the HF tensors on import.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

ATTENTION_BACKENDS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class QwenTextConfig:
    """Hugging Face Qwen2.5-VL text-config names; defaults are the 7B model (Cosmos-Reason1.1-7B)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    dtype: Any = jnp.bfloat16        # compute
    param_dtype: Any = jnp.bfloat16  # the released weights are bf16 and the encoder is frozen
    attention_backend: str = "xla"   # "xla" (any device) | "cudnn" (GPU flash attention)
    scan_layers: bool = False        # True: one scanned layer (fast compile, 1.4x slower at batch 1 on H200)

    def __post_init__(self):
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"QwenTextConfig.attention_backend={self.attention_backend!r}: "
                             f"expected one of {ATTENTION_BACKENDS}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("QwenTextConfig: hidden_size must divide by heads and heads by key/value heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_dim(self) -> int:
        """Width of the recipe's concatenated embedding: every layer's hidden state (28 x 3584 = 100352)."""
        return self.num_hidden_layers * self.hidden_size

    @classmethod
    def tiny(cls, **kw) -> "QwenTextConfig":
        base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, dtype=jnp.float32, param_dtype=jnp.float32)
        return cls(**{**base, **kw})

    @classmethod
    def from_hf_config(cls, hf: dict, source: str = "config.json", **overrides) -> "QwenTextConfig":
        """From a Hugging Face `config.json`: the released flat layout or the nested `text_config` one."""
        text = dict(hf)
        if isinstance(hf.get("text_config"), dict):
            text = {**{k: v for k, v in hf.items() if k != "text_config"}, **hf["text_config"]}
        model_type = text.get("model_type", hf.get("model_type"))
        if model_type not in ("qwen2_5_vl", "qwen2_5_vl_text", "qwen2", "qwen2_vl", "qwen2_vl_text"):
            raise ValueError(f"{source}: model_type {model_type!r} is not a Qwen2 / Qwen2.5-VL language model")
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {text.get('hidden_act')!r} is not supported (silu only)")
        if text.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        scaling = text.get("rope_scaling") or {}
        if scaling.get("type", scaling.get("rope_type", "default")) not in ("default", "mrope"):
            raise ValueError(f"{source}: rope_scaling {scaling} is not supported")
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps")
        missing = [k for k in names if k not in text]
        if missing:
            raise ValueError(f"{source}: missing fields {missing}")
        kw = {k: text[k] for k in names}
        theta = text.get("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return cls(**kw, rope_theta=float(theta), **overrides)


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: fp32 statistics, `weight * x.to(input dtype)`."""

    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return w.astype(x.dtype) * y.astype(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float):
    """cos, sin (S, head_dim) in fp32 for positions 0..S-1, HF layout (the two halves repeat)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x (B, S, H, Dh): x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; in fp32, back to x.dtype."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[None, :, None, :] + rot * sin[None, :, None, :]).astype(x.dtype)


def _dense(features: int, axes: tuple[str, str], cfg: QwenTextConfig, *, use_bias: bool, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


class DecoderLayer(nn.Module):
    cfg: QwenTextConfig

    @nn.compact
    def __call__(self, x, rope):
        cfg = self.cfg
        b, s, _ = x.shape
        nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        cos, sin = rope
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="input_layernorm")(x)
        qkv = _dense((nh + 2 * nkv) * dh, ("embed", "heads"), cfg, use_bias=True, name="qkv_proj")(h)
        q = qkv[..., : nh * dh].reshape(b, s, nh, dh)
        k = qkv[..., nh * dh:(nh + nkv) * dh].reshape(b, s, nkv, dh)
        v = qkv[..., (nh + nkv) * dh:].reshape(b, s, nkv, dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA causal attention, scale 1/sqrt(head_dim) (SDPA default with is_causal=True in the reference)
        impl = "cudnn" if cfg.attention_backend == "cudnn" else "xla"
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(dh), implementation=impl)
        x = x + _dense(cfg.hidden_size, ("heads", "embed"), cfg, use_bias=False, name="o_proj")(o.reshape(b, s, -1))
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="post_attention_layernorm")(x)
        gu = _dense(2 * cfg.intermediate_size, ("embed", "mlp"), cfg, use_bias=False, name="gate_up_proj")(h)
        gate, up = jnp.split(gu, 2, axis=-1)
        x = x + _dense(cfg.hidden_size, ("mlp", "embed"), cfg, use_bias=False, name="down_proj")(nn.silu(gate) * up)
        return x, x


class QwenTextModel(nn.Module):
    """token ids (B, S) -> hidden states (L, B, S, D): outputs of layers 0..L-2 and the final-norm output of layer L-1.

    These are Hugging Face `output_hidden_states[1:]` (index 0, the token embeddings, is what the recipe skips).
    """

    cfg: QwenTextConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.cfg
        table = self.param("embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                         ("vocab", "embed")),
                           (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype)
        x = jnp.take(table, input_ids, axis=0).astype(cfg.dtype)
        rope = rope_cos_sin(input_ids.shape[1], cfg.head_dim, cfg.rope_theta)
        if cfg.scan_layers:
            layers = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=nn.broadcast, length=cfg.num_hidden_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x, hidden = layers(cfg, name="layers")(x, rope)
        else:
            outs = []
            for i in range(cfg.num_hidden_layers):
                x, _ = DecoderLayer(cfg, name=f"layers_{i}")(x, rope)
                outs.append(x)
            hidden = jnp.stack(outs)
        last = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="norm")(x)
        return hidden.at[-1].set(last)


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Stacked (`layers`, leading layer axis) -> per-layer (`layers_0`, ...) parameters for scan_layers=False."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    return out
