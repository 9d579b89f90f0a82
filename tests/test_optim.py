"""Optimizer, LR schedule, clipping (cosmos_jax/training/optim.py) and power EMA (ema.py) against hand values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cosmos_jax.training import ema, optim

# the reference experiment (transfer2_auto_multiview_post_train_example, lr_scheduler.py LambdaLinearScheduler)
SCHED = dict(warm_up_steps=1000, f_start=1e-6, f_max=0.5, f_min=0.2, cycle_length=100000)
LR = 8.63e-5


# ----------------------------------------------------------------------------------------------------------------
# Schedule
@pytest.mark.parametrize("n,want", [
    (0, 1e-6),
    (1, 1e-6 + (0.5 - 1e-6) * 1 / 1000),
    (999, 1e-6 + (0.5 - 1e-6) * 999 / 1000),
    (1000, 0.5),
    (5000, 0.2 + 0.3 * 95000 / 99000),
    (99999, 0.2 + 0.3 * 1 / 99000),
    (100000, 0.2),
    (150000, 0.2),  # beyond the single cycle: held at f_min (the reference has no value there)
])
def test_lambda_linear_by_hand(n, want):
    np.testing.assert_allclose(float(optim.lambda_linear(n, **SCHED)), want, rtol=1e-6)


def test_lr_schedule_by_hand():
    sched = optim.lr_schedule(LR, **SCHED)
    np.testing.assert_allclose(float(sched(5000)), 8.63e-5 * (0.2 + 0.3 * 95000 / 99000), rtol=1e-6)
    np.testing.assert_allclose(float(sched(1000)), 4.315e-5, rtol=1e-6)  # the peak
    np.testing.assert_allclose(float(sched(0)), 8.63e-11, rtol=1e-6)
    # traceable
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray([0, 500, 1000]))),
                               [8.63e-11, 8.63e-5 * (1e-6 + (0.5 - 1e-6) * 0.5), 4.315e-5], rtol=1e-6)


def test_first_update_uses_f0_second_f1():
    opt = optim.make_optimizer(lr=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warm_up_steps=10, f_start=0.1,
                               f_max=0.5, f_min=0.2, cycle_length=100)
    p = {"w": jnp.asarray([1.0, -2.0, 3.0])}
    g = {"w": jnp.asarray([0.5, -4.0, 0.0])}
    state = opt.init(p)
    u1, state = opt.update(g, state, p)
    # first Adam step: m_hat = g, v_hat = g^2 -> step g/(|g| + eps) scaled by lr*f(0) = 0.1*0.1
    # (rtol: the float32 bias corrections 1 - b^t are off by ~1e-5 relative, as in the fp32 fused kernel)
    np.testing.assert_allclose(np.asarray(u1["w"]), [-0.01 * 0.5 / (0.5 + 1e-8), 0.01 * 4 / (4 + 1e-8), 0.0],
                               rtol=3e-5)
    u2, _ = opt.update(g, state, p)
    # constant gradient: m_hat = g, v_hat = g^2 again; lr*f(1) = 0.1*(0.1 + 0.4/10)
    np.testing.assert_allclose(np.asarray(u2["w"]), [-0.014 * 0.5 / (0.5 + 1e-8), 0.014 * 4 / (4 + 1e-8), 0.0],
                               rtol=3e-5)


# ----------------------------------------------------------------------------------------------------------------
# Clipping
def test_clip_by_global_norm_by_hand():
    g = {"a": jnp.asarray([3.0, 4.0]), "b": {"c": jnp.asarray([[12.0]])}}  # norm sqrt(9+16+144) = 13
    clipped, norm = optim.clip_by_global_norm(g, 1.0)
    assert float(norm) == pytest.approx(13.0, rel=1e-7)
    coef = 1.0 / (13.0 + 1e-6)
    np.testing.assert_allclose(np.asarray(clipped["a"]), [3 * coef, 4 * coef], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(clipped["b"]["c"]), [[12 * coef]], rtol=1e-6)
    # below the limit: unchanged (coefficient clamped at 1)
    clipped, _ = optim.clip_by_global_norm(g, 100.0)
    np.testing.assert_array_equal(np.asarray(clipped["a"]), [3.0, 4.0])
    # the 1e-6 in the denominator: norm 2e-6, max 1e-6 -> coefficient 1e-6/3e-6 = 1/3 (not 1/2)
    tiny = {"a": jnp.asarray([2e-6], jnp.float32)}
    clipped, norm = optim.clip_by_global_norm(tiny, 1e-6)
    np.testing.assert_allclose(np.asarray(clipped["a"]), [2e-6 / 3], rtol=1e-5)


def test_nonfinite_gradients_zeroed_then_clipped():
    g = {"a": jnp.asarray([3.0, np.nan, 4.0]), "b": jnp.asarray([np.inf, -np.inf, 12.0])}
    assert int(optim.count_nonfinite(g)) == 3
    clean = optim.zero_nonfinite(g)
    np.testing.assert_array_equal(np.asarray(clean["a"]), [3.0, 0.0, 4.0])
    np.testing.assert_array_equal(np.asarray(clean["b"]), [0.0, 0.0, 12.0])
    assert int(optim.count_nonfinite(clean)) == 0
    clipped, norm = optim.clip_by_global_norm(clean, 0.1)
    assert float(norm) == pytest.approx(13.0, rel=1e-7)
    coef = 0.1 / (13.0 + 1e-6)
    np.testing.assert_allclose(np.asarray(clipped["b"]), [0.0, 0.0, 12 * coef], rtol=1e-6)
    # bf16 leaves keep their dtype; the norm is accumulated in fp32
    clipped, norm = optim.clip_by_global_norm({"a": jnp.asarray([3.0, 4.0], jnp.bfloat16)}, 1.0)
    assert clipped["a"].dtype == jnp.bfloat16 and float(norm) == 5.0


# ----------------------------------------------------------------------------------------------------------------
# AdamW == FusedAdam (adam_w_mode=1, bias_correction=1): optax.adamw(eps_root=0) computes, per parameter,
#   m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; m_hat = m/(1-b1^t); v_hat = v/(1-b2^t)
#   p <- p - lr_t * (m_hat/(sqrt(v_hat)+eps) + wd*p)          (decay decoupled, on every parameter)
def _fused_adamw_numpy(p, grads, *, lr_of_step, b1, b2, eps, wd):
    """Transcription of transformer-engine/apex multi_tensor_adam (ADAM_MODE_1) in float64."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for step, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** step)
        v_hat = v / (1 - b2 ** step)
        update = m_hat / (np.sqrt(v_hat) + eps) + wd * p
        p = p - lr_of_step(step - 1) * update  # LambdaLR steps after the optimizer: step 1 uses f(0)
    return p


def test_adamw_two_steps_match_fused_adam():
    sched = dict(warm_up_steps=10, f_start=0.1, f_max=0.5, f_min=0.2, cycle_length=100)
    hp = dict(b1=0.9, b2=0.999, eps=1e-8)
    lr, wd = 1e-2, 0.05
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((4, 5)).astype(np.float32)
    grads = [rng.standard_normal((4, 5)).astype(np.float32) * s for s in (1.0, 3.0)]
    want = _fused_adamw_numpy(p0, grads, lr_of_step=lambda n: lr * (0.1 + 0.4 * n / 10), wd=wd, **hp)

    opt = optim.make_optimizer(lr=lr, weight_decay=wd, **hp, **sched)
    params = {"w": jnp.asarray(p0)}
    state = opt.init(params)
    step = jax.jit(lambda p, s, g: opt.update(g, s, p))
    for g in grads:
        updates, state = step(params, state, {"w": jnp.asarray(g)})
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(want, p0, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Power EMA
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.2])
def test_gamma_is_max_real_root(rate):
    roots = np.roots([1, 7, 16 - rate ** -2, 12 - rate ** -2])
    want = roots[np.abs(roots.imag) < 1e-9].real.max()
    assert ema.gamma_from_rate(rate) == pytest.approx(want, rel=1e-10)


def test_gamma_and_beta_values():
    gamma = ema.gamma_from_rate(0.1)
    assert gamma == pytest.approx(6.9372, abs=1e-4)
    assert float(ema.beta(0, gamma)) == 0.0
    for n, want in [(10, 0.469), (100, 0.924), (1000, 0.992), (5000, 0.998)]:
        assert float(ema.beta(n, gamma)) == pytest.approx(want, abs=5e-4), n
        exact = (1 - 1 / (n + 1)) ** (gamma + 1)
        assert float(ema.beta(n, gamma)) == pytest.approx(exact, rel=1e-6), n
    np.testing.assert_allclose(np.asarray(jax.jit(ema.beta, static_argnums=1)(jnp.asarray([0, 1]), gamma)),
                               [0.0, 0.5 ** (gamma + 1)], rtol=1e-6)


def test_ema_update_reads_bf16_rounded_params():
    gamma = ema.gamma_from_rate(0.1)
    p = {"w": jnp.asarray([1.0 + 2 ** -10, 3.0], jnp.float32)}  # 1 + 2^-10 is 1.0 in bf16 (8 significant bits)
    # first step (n = 0, beta = 0): the EMA restarts from the (rounded) weights, whatever it held
    e = ema.update({"w": jnp.asarray([100.0, -7.0])}, p, 0, gamma)
    np.testing.assert_array_equal(np.asarray(e["w"]), [1.0, 3.0])
    assert e["w"].dtype == jnp.float32
    e_exact = ema.update({"w": jnp.asarray([100.0, -7.0])}, p, 0, gamma, source_dtype=None)
    np.testing.assert_array_equal(np.asarray(e_exact["w"]), [1.0 + 2 ** -10, 3.0])
    # n = 1: beta = (1/2)^(gamma+1)
    b = 0.5 ** (gamma + 1)
    e2 = ema.update({"w": jnp.asarray([2.0, 0.0])}, {"w": jnp.asarray([1.0 + 2 ** -10, 5.0])}, 1, gamma)
    np.testing.assert_allclose(np.asarray(e2["w"]), [2 * b + (1 - b) * 1.0, (1 - b) * 5.0], rtol=1e-6)
    # late step: the weight of the new params, 1 - beta, keeps its relative precision
    for n in (5000, 100000, 1000000):
        e3 = ema.update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, n, gamma)
        np.testing.assert_allclose(np.asarray(e3["w"]), 1 - (1 - 1 / (n + 1)) ** (gamma + 1), rtol=1e-5)
