"""The reference's denoising loop (UniPC + classifier-free guidance + conditioning frames), network-agnostic.

Reference (nvidia-cosmos/cosmos-transfer2.5): `ControlVideo2WorldModelRectifiedFlow.generate_samples_from_batch`
(transfer2/models/vid2vid_model_control_vace_rectified_flow.py L330-455), the multiview control model's
`get_velocity_fn_from_batch` (transfer2_multiview/models/multiview_vid2vid_model_control_vace_rectified_flow.py
L304-404) and `Video2WorldModelRectifiedFlow.denoise` (predict2/models/video2world_model_rectified_flow.py L76-137).

Per step i of N, with x the current sample ([B, C, V*T, H, W], frames view-major) and t_i the truncated timestep:
  x_in = gt*m + x*(1-m)                          the conditioning frames enter the net clean (both CFG branches:
                                                 `edit_for_inference` keeps the video condition for uncond too)
  v_c, v_u = net(x_in, t_i) for the condition / the negative-prompt uncondition
  v_* <- (noise - gt)*m + v_*(1-m)               `noise` is the INITIAL noise (the sampler passes it to denoise)
  v = v_c + g*(v_c - v_u)                        (MV-control L401; predict2's is v_u + g*(v_c - v_u))
  x <- UniPC step(v, x)
The conditioning frames are never pasted back into x: the loop starts from pure noise at sigma_0 = 0.9998, so
they finish ~2e-4*|noise - gt| away from gt, as the reference's do.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.diffusion import unipc


def initial_noise(seed: int, shape) -> np.ndarray:
    """float32 N(0,1) noise of `shape` from numpy's legacy generator: the reference's `misc.arch_invariant_rand`
    (imaginaire/utils/misc.py L157-178), drawn on the host so it is the same on every machine and device count.

    Layout [B, C, V*T, H, W], views concatenated on the frame axis (view-major), i.e. the reference's noise at
    context-parallel size 1. Under CP the reference splits this tensor along V*T over the CP ranks before its
    per-view reshuffle (and regathers the result per view), so element (frame block r, position v) ends up as view
    v / latent frame r: a reference run reproduces a seed only at its own CP size. Ours is the CP=1 layout whatever
    the device count or sharding.
    """
    return np.random.RandomState(seed).standard_normal(tuple(shape)).astype(np.float32)


def cfg_velocity(v_cond, v_uncond, guidance):
    """Guided velocity of the multiview control model: v_cond + guidance*(v_cond - v_uncond)."""
    return v_cond + guidance * (v_cond - v_uncond)


def condition_input(x, gt, mask):
    """Net input of a denoise call: gt on the conditioning positions (mask 1), x elsewhere (mask [B,1,T,H,W] or
    full shape; gt*m + x*(1-m) exactly as the reference)."""
    return gt * mask + x * (1 - mask)


def condition_velocity(v, noise, gt, mask):
    """Velocity after a denoise call: (noise - gt) on the conditioning positions, the net's elsewhere."""
    return (noise - gt) * mask + v * (1 - mask)


def branch_velocity_fn(net_fn: Callable, cond_kwargs: dict, uncond_kwargs: dict, *, batch_branches: bool = True):
    """A `velocity_fn` for `sample` from a network: net_fn(x, timesteps_B_T, **kwargs) -> velocity [B, ...].

    cond_kwargs / uncond_kwargs: the per-sample keyword arrays of the two CFG branches (same keys, leading batch
    axis B on every leaf; for the DiT: crossattn_emb vs the negative-prompt embedding, and the same control
    latent, conditioning mask, padding mask and view indices in both). Everything not per-sample (params,
    control_weight) lives in net_fn's closure. batch_branches=True: one net call of batch 2B on the concatenation
    [cond; uncond] (shard that batch axis to put the branches on different devices); False: two calls of batch B
    (the reference's order, half the activation memory).
    """
    if batch_branches:
        def velocity_fn(x, timesteps_B_T):
            kw = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), cond_kwargs, uncond_kwargs)
            v = net_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([timesteps_B_T, timesteps_B_T], axis=0),
                       **kw)
            return v[: x.shape[0]], v[x.shape[0]:]
    else:
        def velocity_fn(x, timesteps_B_T):
            return net_fn(x, timesteps_B_T, **cond_kwargs), net_fn(x, timesteps_B_T, **uncond_kwargs)
    return velocity_fn


def sample(velocity_fn: Callable, noise, *, num_steps: int, shift: float = 5.0, guidance, gt=None,
           condition_mask=None, aux: bool = False):
    """Denoise `noise` [B, C, V*T, H, W] in `num_steps` UniPC steps; returns the final latent (float32), or
    (latent, aux_dict) with aux=True. Pure and traceable: wrap the caller in `jax.jit` (one compiled `lax.scan`
    over the steps, no host round trip); num_steps, shift and aux are Python values, guidance may be traced.

    velocity_fn(x_in, timesteps_B_T) -> (v_cond, v_uncond), each [B, C, V*T, H, W]: the net's velocity for the
    condition and the uncondition at x_in (see `branch_velocity_fn`: one call of batch 2B, or two of batch B; the
    conditioning mask the net also takes as an input is the caller's to bind). timesteps_B_T: int32 [B, 1], the
    truncated int(1000*sigma') of the step (the reference feeds an int64 [1, 1] tensor; the net scales by 0.001).
    gt, condition_mask: clean latent [B, C, V*T, H, W] and mask [B, 1, V*T, H, W] of the conditioning frames
    (both or neither); the replacement of the module docstring is applied around every net call.

    Every sample of the batch is denoised independently (the solver is elementwise), so sample b equals a batch-1
    run on noise[b] given a per-sample net. (The reference steps only latents[0].)

    aux: sigmas [N+1], timesteps [N] (int32), x_after_step [N, B, ...] (sample after each step),
    velocity_cfg_per_step [N, B, ...], net_timesteps_per_step [N, B, 1], predictor_order_per_step [N] and the
    step-0 v_cond_step0, v_uncond_step0 (after replacement), net_x_input_step0.
    """
    noise = jnp.asarray(noise, jnp.float32)
    if (gt is None) != (condition_mask is None):
        raise ValueError("gt and condition_mask go together (both or neither)")
    conditioned = gt is not None
    if conditioned:
        gt = jnp.asarray(gt, jnp.float32)
        mask = jnp.asarray(condition_mask, jnp.float32)
        if gt.shape != noise.shape:
            raise ValueError(f"gt shape {gt.shape} != noise shape {noise.shape}")
        if mask.ndim != noise.ndim or mask.shape[0] != noise.shape[0] or mask.shape[2:] != noise.shape[2:]:
            raise ValueError(f"condition_mask shape {mask.shape} must be [B, 1 or C, T, H, W] of {noise.shape}")
    b = noise.shape[0]
    state = unipc.init(noise, num_steps, shift)

    def denoise_step(carry, _):
        x, state, first = carry
        i = state.step
        timesteps_B_T = jnp.full((b, 1), unipc.current_timestep(state), jnp.int32)
        x_in = condition_input(x, gt, mask) if conditioned else x
        v_cond, v_uncond = velocity_fn(x_in, timesteps_B_T)
        v_cond = jnp.asarray(v_cond, jnp.float32)  # the reference casts the net output to float32
        v_uncond = jnp.asarray(v_uncond, jnp.float32)
        if conditioned:
            v_cond = condition_velocity(v_cond, noise, gt, mask)
            v_uncond = condition_velocity(v_uncond, noise, gt, mask)
        v = cfg_velocity(v_cond, v_uncond, guidance)
        order = state.orders[i]
        x_next, state = unipc.step(state, v, x)
        if not aux:
            return (x_next, state, first), None
        first = jax.tree.map(lambda old, new: jnp.where(i == 0, new, old), first, (v_cond, v_uncond, x_in))
        return (x_next, state, first), (x_next, v, timesteps_B_T, order)

    first = (noise, noise, noise) if aux else ()  # step-0 slots, overwritten at i == 0
    (x, state, first), per_step = jax.lax.scan(denoise_step, (noise, state, first), None, length=num_steps)
    if not aux:
        return x
    x_steps, v_steps, t_steps, orders = per_step
    return x, {"sigmas": state.sigmas, "timesteps": state.timesteps, "x_after_step": x_steps,
               "velocity_cfg_per_step": v_steps, "net_timesteps_per_step": t_steps,
               "predictor_order_per_step": orders, "v_cond_step0": first[0], "v_uncond_step0": first[1],
               "net_x_input_step0": first[2]}
