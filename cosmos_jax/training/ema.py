"""Power EMA of the network weights, as the reference (EDM2-style, fixed relative width `rate`).

Reference (nvidia-cosmos/cosmos-transfer2.5): gamma from the rate (predict2/models/text2world_model_rectified_flow.py
L267-268), beta(iteration) (L926-940), the update ema <- beta*ema + (1-beta)*net over all parameters with an fp32 EMA
and the bf16 training weights as source (predict2/utils/dtensor_helper.py L43-53), called with the iteration before
its increment (imaginaire/trainer.py L389-391): beta(0) = 0, so the EMA restarts from the first updated weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gamma_from_rate(rate: float = 0.1) -> float:
    """The exponent gamma: the largest real root of x^3 + 7x^2 + (16 - s^-2)x + (12 - s^-2), s = rate (~6.9372 at 0.1).

    The cubic is (x+2)^2 (x+3) - s^-2 (x+1) = 0, i.e. the power EMA whose profile has relative std s. Solved by
    Newton's method in float64 from an upper bound of the roots (convergence is monotone from the right while the
    root is right of the inflection point -7/3, which holds for every usable rate: the root must exceed -1).
    """
    if not rate > 0:
        raise ValueError(f"EMA rate must be > 0, got {rate}")
    c = 1.0 / float(rate) ** 2
    coeffs = (1.0, 7.0, 16.0 - c, 12.0 - c)

    def f(x):
        return ((x + coeffs[1]) * x + coeffs[2]) * x + coeffs[3]

    def df(x):
        return (3.0 * x + 2.0 * coeffs[1]) * x + coeffs[2]

    x = 1.0 + max(abs(a) for a in coeffs[1:])  # Cauchy bound: every root is below it
    for _ in range(200):
        step = f(x) / df(x)
        x -= step
        if abs(step) <= 1e-15 * max(1.0, abs(x)):
            break
    if not x > -1.0 or abs(f(x)) > 1e-9 * max(1.0, c) or df(x) <= 0:
        raise ValueError(f"EMA rate {rate} gives no power-EMA exponent > -1 (the profile is too wide)")
    return float(x)


def _log_beta(n, gamma: float):
    n = jnp.asarray(n, jnp.float32)
    # (1 - 1/(n+1))^(gamma+1) through log1p/exp so 1 - beta keeps its relative precision at large n in float32
    return (gamma + 1.0) * jnp.log1p(-1.0 / jnp.maximum(n + 1.0, 2.0)), n < 1


def beta(n, gamma: float) -> jax.Array:
    """beta(n) = 0 for n < 1, else (1 - 1/(n+1))^(gamma+1) (float32, traceable)."""
    log_b, first = _log_beta(n, gamma)
    return jnp.where(first, jnp.float32(0), jnp.exp(log_b))


def update(ema, params, n, gamma: float, *, source_dtype=jnp.bfloat16):
    """ema <- beta(n)*ema + (1 - beta(n))*params, float32; n = the iteration before its increment (0 first).

    params are read as the reference's net reads them: rounded to `source_dtype` (the bf16 training weights
    refreshed from the fp32 master copies), then upcast; None keeps them as they are.
    """
    log_b, first = _log_beta(n, gamma)
    b = jnp.where(first, jnp.float32(0), jnp.exp(log_b))
    one_minus_b = jnp.where(first, jnp.float32(1), -jnp.expm1(log_b))

    def one(e, p):
        if source_dtype is not None:
            p = p.astype(source_dtype)
        return (e.astype(jnp.float32) * b + p.astype(jnp.float32) * one_minus_b).astype(jnp.float32)

    return jax.tree.map(one, ema, params)
