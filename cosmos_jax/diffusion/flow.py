"""Rectified-flow training loss of the reference post-training step, as pure functions.

Reference (nvidia-cosmos/cosmos-transfer2.5): `training_step_multiview`
(predict2_multiview/models/multiview_vid2vid_model_rectified_flow.py L577-655), `RectifiedFlow`
(predict2/schedulers/rectified_flow.py L56-172), `Video2WorldModelRectifiedFlow.denoise`
(predict2/models/video2world_model_rectified_flow.py L76-137), the conditioning-frame mask of
`MultiViewCondition.set_video_condition` (predict2_multiview conditioner L240-284) and the text dropout of
`AbstractEmbModel.random_dropout_input` (predict2/conditioner.py L217-225).

Latents are [B, C, V*T, H, W] with frames view-major (index v*T + t), as the DiT input. Notation as in the
reference: x0 the clean latent, eps the noise, u in (0, 1) the logit-normal draw, tau = 1000*sigma the timestep the
net receives, sigma the noise level: x_t = sigma*eps + (1-sigma)*x0, velocity target eps - x0.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

NUM_TRAIN_TIMESTEPS = 1000  # RectifiedFlow.num_train_timesteps: tau in [0, 1000]


# ----------------------------------------------------------------------------------------------------------------
# Per-sample random choices
# ----------------------------------------------------------------------------------------------------------------
def _require_partitionable_threefry():
    # With the partitionable threefry (the default since jax 0.5) a random array's values depend only on the key
    # and the shape, never on how the output is sharded; the loss must not change with the mesh.
    if not getattr(jax.config, "jax_threefry_partitionable", True):  # the flag may retire once always on
        raise RuntimeError("jax_threefry_partitionable is off: random draws would depend on the sharding")


def draw(key, batch: int, *, probs=(0.5, 0.25, 0.25), text_dropout: float = 0.2) -> dict:
    """The per-sample random choices of one training step, deterministic from `key`.

    Returns {"u_B": float32 [B] = sigmoid(N(0,1)) (TrainTimeSampler('logitnormal'), rectified_flow.py L68),
    "k_B": int32 [B] conditioning latent frames per view, P(k = i) = probs[i] (conditional_frames_probs),
    "text_keep_B": bool [B], P(keep) = 1 - text_dropout (per-sample CFG dropout)}.
    The values depend only on the key and `batch`, not on how the arrays end up sharded (jax's partitionable
    threefry, checked here). The noise eps is drawn separately by `noise`.
    """
    _require_partitionable_threefry()
    key_u, key_k, key_text = jax.random.split(key, 3)
    u_B = jax.nn.sigmoid(jax.random.normal(key_u, (batch,), jnp.float32))
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    k_B = jax.random.categorical(key_k, logits, shape=(batch,)).astype(jnp.int32)
    text_keep_B = jax.random.bernoulli(key_text, 1.0 - text_dropout, (batch,))
    return {"u_B": u_B, "k_B": k_B, "text_keep_B": text_keep_B}


def noise(key, shape) -> jax.Array:
    """eps ~ N(0, 1) in float32 of the latent shape (training_step_multiview L618). Sharding-independent values
    (partitionable threefry), so it may be drawn directly into a sharded layout under jit."""
    _require_partitionable_threefry()
    return jax.random.normal(key, shape, jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Noise level and conditioning frames
# ----------------------------------------------------------------------------------------------------------------
def sigma_and_timesteps(u_B, shift: float = 5.0):
    """(sigma [B,1], timesteps [B,1]) from u [B]: tau = (shift*u / (1 + (shift-1)*u)) * 1000, sigma = tau / 1000.

    float32, operations in the reference's order (get_discrete_timestamp L130-135, get_sigmas L137-139), so the
    result is bit-identical to it; tau is fed to the net unrounded.
    """
    u = jnp.asarray(u_B, jnp.float32).reshape(-1, 1)
    tau = (shift * u / (1 + (shift - 1) * u)) * NUM_TRAIN_TIMESTEPS
    return tau / NUM_TRAIN_TIMESTEPS, tau


def conditioning_mask(k_B, n_views: int, frames_per_view: int, h: int, w: int, dtype=jnp.float32):
    """[B, 1, V*T, H, W]: 1 on the first k[b] latent frames of every view (frames view-major, index v*T + t)."""
    t_in_view = jnp.tile(jnp.arange(frames_per_view), n_views)  # [V*T]
    on_B_T = t_in_view[None, :] < jnp.asarray(k_B).reshape(-1, 1)
    return jnp.broadcast_to(on_B_T[:, None, :, None, None],
                            (on_B_T.shape[0], 1, n_views * frames_per_view, h, w)).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------
def training_loss(apply_fn: Callable, x0, eps, u_B, k_B, text_keep_B, *, crossattn_emb,
                  dropped_crossattn_emb=None, latent_control_input, padding_mask, view_indices_B_T,
                  control_weight=1.0, shift: float = 5.0, state_t: int, compute_dtype=jnp.float32):
    """Rectified-flow loss of one batch, as the reference's `training_step_multiview`. Returns (loss, aux).

    apply_fn(**kw) runs the DiT with the keywords of `MultiViewControlDiT.__call__` (x_B_C_T_H_W, timesteps_B_T,
    crossattn_emb, latent_control_input, control_weight, condition_video_input_mask_B_C_T_H_W, padding_mask,
    view_indices_B_T); bind the parameters (and e.g. context_projected=True) in it.
    x0, eps: [B, C, V*T, H, W] (eps from `noise`); u_B, k_B, text_keep_B: from `draw`; state_t: latent frames
    per view. crossattn_emb: [B, N, D] text context; dropped samples get `dropped_crossattn_emb` instead (default
    zeros, the reference's dropout; a caller feeding already-projected contexts passes the projection of zeros,
    broadcastable to crossattn_emb). compute_dtype: the dtype of the net input (the reference casts x_t to bf16
    in training); the loss math is float32.

    aux: sigma, timesteps [B,1]; x_t, v_target, net_x_input, net_out_raw, v_pred [B,C,V*T,H,W];
    per_sample_loss [B]; loss; crossattn_emb_fed; condition_mask [B,1,V*T,H,W].
    """
    x0 = jnp.asarray(x0, jnp.float32)
    eps = jnp.asarray(eps, jnp.float32)
    b, _, t_total, h, w = x0.shape
    if eps.shape != x0.shape:
        raise ValueError(f"eps shape {eps.shape} != x0 shape {x0.shape}")
    if t_total % state_t:
        raise ValueError(f"{t_total} latent frames is not a whole number of views of state_t={state_t}")

    # text dropout: the whole (all-view) context of a dropped sample is replaced (conditioner.py L217-225)
    keep = jnp.asarray(text_keep_B, bool).reshape(b, *([1] * (crossattn_emb.ndim - 1)))
    if dropped_crossattn_emb is None:
        dropped = jnp.zeros_like(crossattn_emb)
    else:
        dropped = jnp.broadcast_to(jnp.asarray(dropped_crossattn_emb, crossattn_emb.dtype), crossattn_emb.shape)
    crossattn_fed = jnp.where(keep, crossattn_emb, dropped)

    # conditioning frames (first k latent frames of every view) and noise level
    mask = conditioning_mask(k_B, t_total // state_t, state_t, h, w, jnp.float32)
    cond = mask > 0  # selects with `where`: conditioning positions take x0 / v_target exactly, whatever the net
    sigma, tau = sigma_and_timesteps(u_B, shift)
    sigma_b = sigma.reshape(b, 1, 1, 1, 1)
    x_t = eps * sigma_b + x0 * (1 - sigma_b)  # get_interpolation L141-172 (x_0 = noise, x_1 = data there)
    v_target = eps - x0

    # denoise (video2world L76-137): clean x0 on conditioning frames in, net output cast to float32, the
    # conditioning frames' velocity replaced by the target (those positions add exactly 0 to the loss)
    net_x_input = jnp.where(cond, x0, x_t).astype(compute_dtype)
    out = apply_fn(x_B_C_T_H_W=net_x_input, timesteps_B_T=tau, crossattn_emb=crossattn_fed,
                   latent_control_input=latent_control_input, control_weight=control_weight,
                   condition_video_input_mask_B_C_T_H_W=mask.astype(compute_dtype), padding_mask=padding_mask,
                   view_indices_B_T=view_indices_B_T)
    net_out_raw = out.astype(jnp.float32)
    v_pred = jnp.where(cond, v_target, net_out_raw)

    # uniform time weight; mean over every position incl. the zero-error conditioning ones (L641-644)
    per_sample_loss = jnp.mean(jnp.square(v_pred - v_target), axis=(1, 2, 3, 4))
    loss = jnp.mean(per_sample_loss)
    aux = {"sigma": sigma, "timesteps": tau, "x_t": x_t, "v_target": v_target, "net_x_input": net_x_input,
           "net_out_raw": net_out_raw, "v_pred": v_pred, "per_sample_loss": per_sample_loss, "loss": loss,
           "crossattn_emb_fed": crossattn_fed, "condition_mask": mask}
    return loss, aux
