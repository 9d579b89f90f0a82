"""Multi-camera 3D RoPE (reference: `VideoRopePosition3DEmb` + `MultiCameraVideoRopePosition3DEmb`).

The head dimension is split into [t | h | w] angle groups (dim_t = head_dim - 2*dim_h, dim_h = dim_w =
head_dim // 6 * 2), each with its own NTK-scaled base theta = 10000 * ratio ** (dim / (dim - 2)); the angle vector is
repeated twice (non-interleaved rotate-half). Positions restart at 0 in every view; views are concatenated
view-major. No fps modulation (the auto-multiview model turns it off).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from cosmos_jax.models.dit_config import DiTConfig


def rope_ranges(cfg: DiTConfig) -> tuple[np.ndarray, np.ndarray]:
    """The reference's persistent buffers `dim_spatial_range` and `dim_temporal_range` (fp32)."""
    dim_t, dim_h, _ = cfg.rope_dims
    spatial = np.arange(0, dim_h, 2)[: dim_h // 2].astype(np.float32) / np.float32(dim_h)
    temporal = np.arange(0, dim_t, 2)[: dim_t // 2].astype(np.float32) / np.float32(dim_t)
    if cfg.rope_ranges_bf16:
        # The released *_ema_bf16.pt stores these buffers rounded to bf16 and the reference loads them as they are.
        spatial = spatial.astype(ml_dtypes.bfloat16).astype(np.float32)
        temporal = temporal.astype(ml_dtypes.bfloat16).astype(np.float32)
    return spatial, temporal


def _axis_angles(n: int, ratio: float, dim: int, dim_range: np.ndarray) -> np.ndarray:
    theta = 10000.0 * ratio ** (dim / (dim - 2))
    freqs = np.float32(1.0) / np.power(np.float32(theta), dim_range, dtype=np.float32)
    return np.outer(np.arange(n, dtype=np.float32), freqs).astype(np.float32)


def rope_angles(cfg: DiTConfig, n_views: int, t: int, h: int, w: int) -> jnp.ndarray:
    """RoPE angles [V*T*H*W, head_dim] (fp32) for a view-major token grid; T, H, W are per view, after patchify."""
    if h > cfg.max_img_h // cfg.patch_spatial or w > cfg.max_img_w // cfg.patch_spatial:
        raise ValueError(f"latent grid {h}x{w} tokens exceeds the RoPE maximum "
                         f"{cfg.max_img_h // cfg.patch_spatial}x{cfg.max_img_w // cfg.patch_spatial}")
    if t > cfg.rope_max_len:
        raise ValueError(f"{t} latent frames per view exceed the RoPE maximum {cfg.rope_max_len}")
    dim_t, dim_h, dim_w = cfg.rope_dims
    spatial, temporal = rope_ranges(cfg)
    # Small per-axis tables are numpy constants; the [L, head_dim] table is assembled by XLA (no huge literals).
    at = jnp.asarray(_axis_angles(t, cfg.rope_t_extrapolation_ratio, dim_t, temporal))
    ah = jnp.asarray(_axis_angles(h, cfg.rope_h_extrapolation_ratio, dim_h, spatial))
    aw = jnp.asarray(_axis_angles(w, cfg.rope_w_extrapolation_ratio, dim_w, spatial))
    grid = jnp.concatenate([
        jnp.broadcast_to(at[:, None, None, :], (t, h, w, at.shape[-1])),
        jnp.broadcast_to(ah[None, :, None, :], (t, h, w, ah.shape[-1])),
        jnp.broadcast_to(aw[None, None, :, :], (t, h, w, aw.shape[-1])),
    ], axis=-1)
    grid = jnp.concatenate([grid, grid], axis=-1).reshape(t * h * w, cfg.head_dim)
    return jnp.tile(grid, (n_views, 1))
