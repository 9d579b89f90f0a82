"""Model FLOPs of the DiT (forward, full backward, post-training step), for MFU.

Convention (the benchmarks use it too): a matmul of M x K x N costs 2*M*K*N; attention 4*S^2*D per layer forward
(QK^T and PV) and 2.5x that in the backward; the backward of a linear layer costs 2x its forward when its weight
gradient is needed (dX and dW) and 1x when it is frozen (dX only). Recomputation from remat is not counted.
"""

from __future__ import annotations

from cosmos_jax.models.dit_config import DiTConfig


def _counts(cfg: DiTConfig, n_views: int, t: int, h: int, w: int) -> dict:
    d = cfg.model_channels
    s = n_views * t * (h // cfg.patch_spatial) * (w // cfg.patch_spatial)  # video tokens
    m = n_views * cfg.crossattn_tokens_per_view                             # text tokens
    dc = cfg.crossattn_emb_channels
    block_macs = s * (4 * d * d + 2 * d * d + 2 * d * cfg.mlp_hidden) + m * 2 * dc * d
    attn_fwd = 4 * s * s * d + 4 * s * cfg.crossattn_tokens_per_view * d  # self + per-view cross, one layer
    base_macs = (cfg.num_blocks * block_macs + s * cfg.x_in_channels * cfg.patch_temporal * cfg.patch_spatial ** 2 * d
                 + s * d * cfg.patch_dim_out + m * cfg.crossattn_proj_in_channels * dc)
    control_macs = (cfg.num_control_blocks * (block_macs + s * d * d)  # + after_proj
                    + s * cfg.control_in_channels * cfg.patch_temporal * cfg.patch_spatial ** 2 * d
                    + s * (cfg.hint_layers + 1) * d * d)                 # hint MLP + before_proj
    n_layers = cfg.num_blocks + cfg.num_control_blocks
    return {"tokens": s, "base_macs": base_macs, "control_macs": control_macs, "attn_fwd": n_layers * attn_fwd}


def forward_flops(cfg: DiTConfig, n_views: int, t: int, h: int, w: int) -> float:
    c = _counts(cfg, n_views, t, h, w)
    return 2.0 * (c["base_macs"] + c["control_macs"]) + c["attn_fwd"]


def train_step_flops(cfg: DiTConfig, n_views: int, t: int, h: int, w: int, *, all_weights: bool = False) -> float:
    """FLOPs of one forward + backward for one sample; weight gradients only for the control branch unless
    `all_weights` (the text projection's input gradient is never needed: its input is data)."""
    c = _counts(cfg, n_views, t, h, w)
    fwd_linear = 2.0 * (c["base_macs"] + c["control_macs"])
    proj = 2.0 * (n_views * cfg.crossattn_tokens_per_view * cfg.crossattn_proj_in_channels
                  * cfg.crossattn_emb_channels)
    dx = fwd_linear - proj
    dw = fwd_linear if all_weights else 2.0 * c["control_macs"]
    return fwd_linear + dx + dw + 3.5 * c["attn_fwd"]
