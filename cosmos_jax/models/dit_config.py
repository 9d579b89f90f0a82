"""Hyper-parameters of the multiview control DiT (reference: `MultiViewControlDiT`).

A frozen dataclass built at the edge (config file, parity case, checkpoint import); layers receive only the
fields they need. Field names follow the reference constructor kwargs so a reader can map one to the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

# Reference kwargs whose value we implement exactly one way. Anything else is refused with a clear error instead of
# being silently ignored (e.g. a checkpoint trained with fps-modulated RoPE would give wrong results here).
_FIXED_REFERENCE_OPTIONS = {
    "concat_padding_mask": True,
    "pos_emb_cls": "rope3d",
    "use_adaln_lora": True,
    "extra_per_block_abs_pos_emb": False,
    "concat_view_embedding": True,
    "vace_has_mask": False,
    "rope_enable_fps_modulation": False,
    "use_crossattn_projection": True,
}
# Reference kwargs that only steer PyTorch execution (attention kernel, activation checkpointing, init) or that the
# reference constructor accepts and drops; they do not change the function the network computes.
_EXECUTION_ONLY_OPTIONS = {
    "atten_backend", "sac_config", "use_wan_fp32_strategy", "n_cameras", "pos_emb_learnable",
    "pos_emb_interpolation", "use_cuda_graphs", "dense_n_blocks", "gna_parameters",
}

REMAT_POLICIES = ("none", "full", "save_attention", "save_self_attention", "save_dots",
                  "save_attention_and_dots", "offload_attention")
ATTENTION_BACKENDS = ("xla", "cudnn", "fa3", "fp8", "fp8_full")  # ops/attention.py; configs may also say "auto" (build.py)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    # --- architecture (reference kwarg names) ---
    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 16
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    adaln_lora_dim: int = 256
    max_img_h: int = 240
    max_img_w: int = 240
    max_frames: int = 128
    rope_h_extrapolation_ratio: float = 3.0
    rope_w_extrapolation_ratio: float = 3.0
    rope_t_extrapolation_ratio: float = 1.0 / 3.0
    n_cameras_emb: int = 7
    view_condition_dim: int = 7
    state_t: int = 8
    vace_block_every_n: int = 7
    condition_strategy: str = "spaced"
    num_max_modalities: int = 8
    use_input_hint_block: bool = True
    hint_layers: int = 7  # reference hint_nf default [D]*8 -> 7 Linear+SiLU pairs
    timestep_scale: float = 0.001
    crossattn_proj_in_channels: int = 100352
    crossattn_emb_channels: int = 1024
    crossattn_tokens_per_view: int = 512  # hard-coded in the reference MultiViewCrossAttention
    # The reference's RoPE range buffers are part of its checkpoints; *_ema_bf16.pt holds them rounded to bf16 and
    # the reference uses them as loaded. A config field (saved with our checkpoints); weight import verifies that
    # the file agrees with it (weights/keymap.py) and never changes it.
    rope_ranges_bf16: bool = False
    # --- execution (ours) ---
    dtype: Any = jnp.bfloat16  # compute dtype of the blocks
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    remat_policy: str = "none"

    def __post_init__(self):
        # jnp.bfloat16 (a scalar type), "bfloat16" and jnp.dtype("bfloat16") name one dtype: store one form so equal
        # configs compare and hash equal (a jit static argument must not recompile for a spelling difference).
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
        if self.model_channels % self.num_heads:
            raise ValueError(f"model_channels {self.model_channels} not divisible by num_heads {self.num_heads}")
        if self.condition_strategy not in ("spaced", "first_n"):
            raise ValueError(f"condition_strategy must be 'spaced' or 'first_n', got {self.condition_strategy!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if 0 not in self.control_layers:
            raise ValueError("the reference requires base block 0 to receive a control hint")

    # --- derived quantities (reference formulas) ---
    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.model_channels * self.mlp_ratio)

    @property
    def x_in_channels(self) -> int:
        """x latent + condition mask + padding mask + view embedding."""
        return self.in_channels + 1 + 1 + self.view_condition_dim

    @property
    def control_padded_channels(self) -> int:
        """Control latent is zero-padded to (in + view_dim) * modalities (reference quirk: view dim counted)."""
        return (self.in_channels + self.view_condition_dim) * self.num_max_modalities

    @property
    def control_in_channels(self) -> int:
        return self.control_padded_channels + 1 + 1 + self.view_condition_dim

    @property
    def patch_dim_out(self) -> int:
        return self.patch_spatial * self.patch_spatial * self.patch_temporal * self.out_channels

    @property
    def control_layers(self) -> tuple[int, ...]:
        if self.condition_strategy == "spaced":
            return tuple(range(0, self.num_blocks, self.vace_block_every_n))
        return tuple(range(0, self.num_blocks // self.vace_block_every_n))

    @property
    def num_control_blocks(self) -> int:
        return len(self.control_layers)

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """(dim_t, dim_h, dim_w) of the head dimension, as the reference splits it."""
        dim_h = self.head_dim // 6 * 2
        return self.head_dim - 2 * dim_h, dim_h, dim_h

    @property
    def rope_max_len(self) -> int:
        return max(self.max_img_h // self.patch_spatial, self.max_img_w // self.patch_spatial,
                   self.max_frames // self.patch_temporal)

    # --- named constructors ---
    @classmethod
    def real_2b(cls, **overrides) -> "DiTConfig":
        """Cosmos-Transfer2.5 auto/multiview 2B (net `cosmos_v1_2B_multiview_control` + experiment overrides)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "DiTConfig":
        """The sizes of the parity fixture caseA: runs in seconds on a CPU."""
        kw = dict(model_channels=64, num_blocks=4, num_heads=4, adaln_lora_dim=16, vace_block_every_n=2, state_t=2,
                  crossattn_proj_in_channels=48, crossattn_emb_channels=32, dtype=jnp.float32)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_reference_kwargs(cls, kwargs: Mapping[str, Any], **overrides) -> "DiTConfig":
        """Build from the reference constructor kwargs (e.g. `case.json` -> `constructor_kwargs_tiny`)."""
        kwargs = dict(kwargs)
        for name, want in _FIXED_REFERENCE_OPTIONS.items():
            got = kwargs.pop(name, want)
            if got != want:
                raise NotImplementedError(f"reference option {name}={got!r} is not supported "
                                          f"(only {want!r} is implemented)")
        for name in _EXECUTION_ONLY_OPTIONS:
            kwargs.pop(name, None)
        if "hint_nf" in kwargs:
            hint_nf = kwargs.pop("hint_nf")
            if any(h != kwargs.get("model_channels", cls.model_channels) for h in hint_nf):
                raise NotImplementedError(f"hint_nf must be all model_channels, got {hint_nf}")
            kwargs["hint_layers"] = len(hint_nf) - 1
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown reference DiT kwargs: {unknown}")
        kwargs.update(overrides)
        return cls(**kwargs)
