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

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class StepCache:
    """Opt-in reuse of the net's velocities across steps (MagCache-style, calibration-free; off by default).

    The net's output changes smoothly over most of the trajectory: the ratio r_i = |v_i| / |v_{i-1}| of the mean
    absolute velocities of consecutive steps stays near 1 there. MagCache skips a step's net call (reusing the last
    computed v_cond, v_uncond) while the accumulated error estimate sum |1 - r| stays under `threshold`, with r
    predicted per step from a calibration run; here r is predicted online as the last ratio measured between two
    computed steps. A computed step resets the estimate. Never skipped: the first `warmup` steps, the last `final`
    steps, and more than `max_skips` steps in a row. `threshold` 0 turns it off (the exact sampler).

    The decision is one per call (the whole batch skips or computes together), so with the cache on a batch sample
    is no longer exactly its own batch-1 run. Its quality cost and speed-up are measured by
    `bench/bench_infer.py --cache` (PSNR / SSIM against the uncached sample of the same seed).
    """
    threshold: float = 0.0
    max_skips: int = 2
    warmup: int = 4
    final: int = 2

    @property
    def enabled(self) -> bool:
        return self.threshold > 0


def _mean_abs(v):
    return jnp.mean(jnp.abs(v))


def sample(velocity_fn: Callable, noise, *, num_steps: int, shift: float = 5.0, guidance, gt=None,
           condition_mask=None, aux: bool = False, cache: StepCache | None = None):
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
    step-0 v_cond_step0, v_uncond_step0 (after replacement), net_x_input_step0, and net_computed_per_step [N]
    (bool: False where the step cache reused the previous velocities).

    cache: a `StepCache` with threshold > 0 skips net calls (see there); None or threshold 0 = the exact sampler.
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

    use_cache = cache is not None and cache.enabled

    def net_velocities(x_in, timesteps_B_T):
        v_cond, v_uncond = velocity_fn(x_in, timesteps_B_T)
        # the reference casts the net output to float32
        return jnp.asarray(v_cond, jnp.float32), jnp.asarray(v_uncond, jnp.float32)

    def decide(i, cstate):
        """(skip this step?, the error estimate if it is skipped)."""
        err, skips, ratio = cstate["err"], cstate["skips"], cstate["ratio"]
        new_err = err + jnp.abs(1.0 - ratio)
        ok = ((i >= cache.warmup) & (i < num_steps - cache.final) & (skips < cache.max_skips)
              & (new_err < cache.threshold) & cstate["have_ratio"])
        return ok, new_err

    def denoise_step(carry, _):
        x, state, first, cstate = carry
        i = state.step
        timesteps_B_T = jnp.full((b, 1), unipc.current_timestep(state), jnp.int32)
        x_in = condition_input(x, gt, mask) if conditioned else x
        if use_cache:
            skip, new_err = decide(i, cstate)
            v_cond, v_uncond = jax.lax.cond(skip, lambda: (cstate["v_cond"], cstate["v_uncond"]),
                                            lambda: net_velocities(x_in, timesteps_B_T))
            mag = _mean_abs(v_cond)
            ratio = jnp.where(skip | (cstate["last_mag"] <= 0), cstate["ratio"], mag / cstate["last_mag"])
            cstate = {"v_cond": v_cond, "v_uncond": v_uncond, "last_mag": jnp.where(skip, cstate["last_mag"], mag),
                      "ratio": ratio, "have_ratio": cstate["have_ratio"] | (~skip & (cstate["last_mag"] > 0)),
                      "err": jnp.where(skip, new_err, 0.0), "skips": jnp.where(skip, cstate["skips"] + 1, 0)}
            computed = ~skip
        else:
            v_cond, v_uncond = net_velocities(x_in, timesteps_B_T)
            computed = jnp.bool_(True)
        if conditioned:
            v_cond = condition_velocity(v_cond, noise, gt, mask)
            v_uncond = condition_velocity(v_uncond, noise, gt, mask)
        v = cfg_velocity(v_cond, v_uncond, guidance)
        order = state.orders[i]
        x_next, state = unipc.step(state, v, x)
        if not aux:
            return (x_next, state, first, cstate), None
        first = jax.tree.map(lambda old, new: jnp.where(i == 0, new, old), first, (v_cond, v_uncond, x_in))
        return (x_next, state, first, cstate), (x_next, v, timesteps_B_T, order, computed)

    first = (noise, noise, noise) if aux else ()  # step-0 slots, overwritten at i == 0
    cstate = {}
    if use_cache:  # the raw net velocities of the last computed step and the error estimate
        zero = jnp.float32(0)
        cstate = {"v_cond": jnp.zeros_like(noise), "v_uncond": jnp.zeros_like(noise), "last_mag": zero,
                  "ratio": jnp.float32(1), "have_ratio": jnp.bool_(False), "err": zero, "skips": jnp.int32(0)}
    (x, state, first, _), per_step = jax.lax.scan(denoise_step, (noise, state, first, cstate), None,
                                                  length=num_steps)
    if not aux:
        return x
    x_steps, v_steps, t_steps, orders, computed = per_step
    return x, {"sigmas": state.sigmas, "timesteps": state.timesteps, "x_after_step": x_steps,
               "velocity_cfg_per_step": v_steps, "net_timesteps_per_step": t_steps,
               "predictor_order_per_step": orders, "v_cond_step0": first[0], "v_uncond_step0": first[1],
               "net_x_input_step0": first[2], "net_computed_per_step": computed}
