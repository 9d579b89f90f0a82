"""Optimizer, learning-rate schedule and gradient clipping of the reference post-training (optax).

Reference (nvidia-cosmos/cosmos-transfer2.5):
* FusedAdam in AdamW mode, bias correction, fp32 master weights (predict2/utils/fused_adam_dtensor.py;
  predict2/configs/common/defaults/optimizer.py); one parameter group, weight decay on every trainable parameter
  (predict2/utils/optim_instantiate.py L49-59).
* LambdaLinearScheduler through LambdaLR (imaginaire/functional/lr_scheduler.py L157-178); the scheduler steps
  after the optimizer, so the first update uses f(0).
* GradClip callback (predict2/callbacks/grad_clip.py): non-finite gradient entries -> 0, then
  torch.nn.utils.clip_grad_norm_ over all parameters.

Use in a train step (clipping is a plain function so the pre-clip norm can be logged):

    n_bad = count_nonfinite(grads)
    grads, grad_norm = clip_by_global_norm(zero_nonfinite(grads), clip_norm)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


# ----------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------
def lambda_linear(n, *, warm_up_steps: int, f_start: float, f_max: float, f_min: float, cycle_length: int):
    """LambdaLinearScheduler multiplier f(n) (one cycle; traceable, float32).

    n < warm_up_steps: f_start + (f_max - f_start) * n / warm_up_steps (linear warm-up);
    otherwise f_min + (f_max - f_min) * (cycle_length - n) / (cycle_length - warm_up_steps) (linear decay).
    For n >= cycle_length we hold f_min: the reference has one cycle and fails beyond it (find_in_interval finds no
    interval), so a run past cycle_length has no reference value and the floor is the natural continuation.
    """
    n = jnp.asarray(n, jnp.float32)
    warm = jnp.float32(warm_up_steps)
    if warm_up_steps > 0:
        f_warm = (f_max - f_start) / warm * n + f_start  # the reference's operation order
    else:
        f_warm = jnp.float32(f_max)
    f_decay = f_min + (f_max - f_min) * (cycle_length - n) / jnp.float32(cycle_length - warm_up_steps)
    f = jnp.where(n < warm, f_warm, f_decay)
    return jnp.where(n >= cycle_length, jnp.float32(f_min), f)


def lr_schedule(base_lr: float, **schedule_kw) -> optax.Schedule:
    """optax schedule lr(count) = base_lr * lambda_linear(count): the update with count == 0 (the first) uses f(0)."""
    def schedule(count):
        return base_lr * lambda_linear(count, **schedule_kw)
    return schedule


# ----------------------------------------------------------------------------------------------------------------
# Gradient sanitising and clipping
# ----------------------------------------------------------------------------------------------------------------
def count_nonfinite(tree) -> jax.Array:
    """Number of NaN/inf entries over all leaves (int32 scalar), for logging before `zero_nonfinite`."""
    counts = [jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in jax.tree.leaves(tree)]
    return sum(counts, jnp.int32(0))


def zero_nonfinite(tree):
    """NaN, +inf, -inf -> 0 in every leaf (torch.nan_to_num(nan=0, posinf=0, neginf=0), grad_clip.py L28-30)."""
    return jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)), tree)


def global_norm(tree) -> jax.Array:
    """L2 norm over all leaves, accumulated in float32."""
    sq = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(sq, jnp.float32(0)))


def clip_by_global_norm(grads, max_norm: float):
    """(clipped grads, pre-clip global norm) as torch.nn.utils.clip_grad_norm_: every leaf is multiplied by
    min(1, max_norm / (norm + 1e-6)). Non-finite entries are not handled here: apply `zero_nonfinite` first."""
    norm = global_norm(grads)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), grads), norm


# ----------------------------------------------------------------------------------------------------------------
# AdamW
# ----------------------------------------------------------------------------------------------------------------
def make_optimizer(*, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-3,
                   warm_up_steps: int, f_start: float, f_max: float, f_min: float,
                   cycle_length: int) -> optax.GradientTransformation:
    """AdamW with the LambdaLinear schedule, the FusedAdam (adam_w_mode=1, bias_correction=1) update:

        m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  m_hat = m/(1-b1^t);  v_hat = v/(1-b2^t)
        p -= lr(t-1) * (m_hat/(sqrt(v_hat) + eps) + weight_decay*p)

    which is optax.adamw with eps_root=0 and no mask (decay on every parameter, as the reference's single
    parameter group). Give it fp32 parameters (the reference's master weights). Clipping is not part of it: see
    `clip_by_global_norm` (the caller logs the pre-clip norm).
    """
    schedule = lr_schedule(lr, warm_up_steps=warm_up_steps, f_start=f_start, f_max=f_max, f_min=f_min,
                           cycle_length=cycle_length)
    return optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps, eps_root=0.0, weight_decay=weight_decay,
                       mask=None)
