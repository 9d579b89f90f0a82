"""The UniPC sampler and the denoising loop (cosmos_jax/diffusion/unipc.py, sampling.py) against the reference's
sampler oracle (tests/fixtures/sampler/sampleA), hand values of the reference grid, and diffusers'
UniPCMultistepScheduler (an independent implementation, torch) on a toy velocity field over full loops."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import fixtures_dir
from cosmos_jax.diffusion import sampling, unipc
from tools import parity


@pytest.fixture(scope="module")
def sample_case():
    return fixtures_dir() / "sampler" / "sampleA"


# ----------------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------------
def _reference_grid(n, shift):
    """The reference's grid, written from its formula: sigma_max is the float32 base-grid value of 1 - 1/1000."""
    sigma_max = float(np.float32(1.0 - np.linspace(1.0, 1.0 / 1000, 1000)[::-1][0]))
    s = np.linspace(sigma_max, 0.0, n + 1)[:-1]
    shifted = shift * s / (1.0 + (shift - 1.0) * s)
    return np.append(shifted, 0.0).astype(np.float32), np.trunc(shifted * 1000).astype(np.int64)


def test_grid_35_steps_shift_5():
    sig, ts = unipc.sigmas(35, 5.0), unipc.net_timesteps(35, 5.0)
    ref_sig, ref_ts = _reference_grid(35, 5.0)
    assert sig.shape == (36,) and sig.dtype == np.float32 and sig[-1] == 0.0
    np.testing.assert_allclose(sig, ref_sig, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ts, ref_ts)
    # literals of the reference run (docs §4.5)
    assert round(float(sig[0]), 4) == 0.9998 and round(float(sig[-2]), 4) == 0.1281
    assert ts[:5].tolist() == [999, 993, 987, 981, 974] and ts[-3:].tolist() == [318, 232, 128]
    assert unipc.predictor_orders(35).tolist() == [1] + [2] * 33 + [1]


def test_grid_matches_fixture(sample_case):
    out = np.load(sample_case / "output.npz")
    n = len(out["timesteps"])
    np.testing.assert_allclose(unipc.sigmas(n, 5.0), out["sigmas"], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(unipc.net_timesteps(n, 5.0), out["timesteps"])
    np.testing.assert_array_equal(unipc.predictor_orders(n), out["predictor_order_per_step"])


def test_solver_alone_replays_fixture(sample_case):
    """Recorded guided velocities in, the reference's x after every step out (case.json: <= 1e-5)."""
    inp, out = np.load(sample_case / "inputs.npz"), np.load(sample_case / "output.npz")
    velocities = jnp.asarray(out["velocity_cfg_per_step"])
    x0 = jnp.asarray(inp["noise_B_C_T_H_W"])

    @jax.jit
    def replay(x, velocities):
        def body(carry, v):
            x, state = carry
            x, state = unipc.step(state, v, x)
            return (x, state), x
        return jax.lax.scan(body, (x, unipc.init(x, velocities.shape[0], 5.0)), velocities)[1]

    xs = np.asarray(replay(x0, velocities))
    assert np.abs(xs - out["x_after_step"]).max() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# The reference case through the CLI
# ----------------------------------------------------------------------------------------------------------------
def test_sample_a_parity_cli(sample_case, tmp_path):
    out_path = tmp_path / "sample.npz"
    parity.main(["sample", "--case", str(sample_case), "--out", str(out_path)])
    got, ref = np.load(out_path), np.load(sample_case / "output.npz")
    assert set(ref.files) <= set(got.files)
    for k in ref.files:
        assert got[k].shape == ref[k].shape, k
    diff = lambda k: np.abs(got[k].astype(np.float64) - ref[k])  # noqa: E731
    for k in ("samples_B_C_T_H_W", "x_after_step"):
        assert diff(k).max() <= 2e-4 and diff(k).mean() <= 2e-5, (k, diff(k).max())
    assert diff("velocity_cfg_per_step").max() <= 5e-4
    for k in ("v_cond_step0", "v_uncond_step0", "net_x_input_step0"):
        assert diff(k).max() <= 2e-4, k
    assert diff("sigmas").max() <= 1e-7
    for k in ("timesteps", "net_timesteps_per_step", "predictor_order_per_step"):
        np.testing.assert_array_equal(got[k], ref[k])

    # conditioning frames: the net saw gt there at step 0, but they are not pasted back at the end (~1e-3 off)
    inp = np.load(sample_case / "inputs.npz")
    m = np.broadcast_to(inp["condition_video_input_mask_B_C_T_H_W"], inp["gt_B_C_T_H_W"].shape) > 0
    assert m.any() and not m.all()
    np.testing.assert_array_equal(got["net_x_input_step0"][m], inp["gt_B_C_T_H_W"][m])
    off = np.abs(got["samples_B_C_T_H_W"][m] - inp["gt_B_C_T_H_W"][m]).max()
    assert 1e-5 < off < 1e-2, off


# ----------------------------------------------------------------------------------------------------------------
# Against diffusers on a toy field
# ----------------------------------------------------------------------------------------------------------------
def _toy_fields(seed, shape):
    """Two smooth velocity fields v(x, t) = a*x + b*sin(x) + c*t/1000 + d*roll(x, 1, frames) (cond, uncond; the
    roll mixes neighbouring frames, so what the net sees on conditioning frames matters elsewhere), as numpy
    coefficients (for torch) and a jax function."""
    rng = np.random.default_rng(seed)
    coefs = [tuple(rng.uniform(lo, hi, shape).astype(np.float32) for lo, hi in ((-1, 1), (-1, 1), (-2, 2), (-0.5, 0.5)))
             for _ in range(2)]

    def jax_fn(x, timesteps_B_T):
        t = timesteps_B_T.astype(jnp.float32).reshape(-1, *([1] * (x.ndim - 1))) / 1000
        return tuple(a * x + b * jnp.sin(x) + c * t + d * jnp.roll(x, 1, axis=2) for a, b, c, d in coefs)

    return coefs, jax_fn


def _diffusers_loop(coefs, noise, n, shift, guidance, gt=None, mask=None):
    """The reference's loop written independently around diffusers' UniPCMultistepScheduler (torch, float32)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", predict_x0=True,
        solver_type="bh2", lower_order_final=True, use_flow_sigmas=True, flow_shift=shift,
        final_sigmas_type="zero", thresholding=False)
    sigma_max = float(np.float32(0.999))
    sched.set_timesteps(sigmas=np.linspace(sigma_max, 0.0, n + 1)[:-1])
    (a_c, b_c, c_c, d_c), (a_u, b_u, c_u, d_u) = [[torch.from_numpy(c) for c in f] for f in coefs]
    noise_t = torch.from_numpy(np.asarray(noise))
    x = noise_t.clone()
    if gt is not None:
        gt_t, m = torch.from_numpy(np.asarray(gt)), torch.from_numpy(np.asarray(mask))
    for t in sched.timesteps:
        x_in = gt_t * m + x * (1 - m) if gt is not None else x
        tt = t.to(torch.float32) / 1000
        rolled = torch.roll(x_in, 1, dims=2)
        v_c = a_c * x_in + b_c * torch.sin(x_in) + c_c * tt + d_c * rolled
        v_u = a_u * x_in + b_u * torch.sin(x_in) + c_u * tt + d_u * rolled
        if gt is not None:
            v_c = (noise_t - gt_t) * m + v_c * (1 - m)
            v_u = (noise_t - gt_t) * m + v_u * (1 - m)
        x = sched.step(v_c + guidance * (v_c - v_u), t, x).prev_sample
    return x.numpy(), sched.timesteps.numpy(), sched.sigmas.numpy()


@pytest.mark.parametrize("n,conditioned", [(35, True), (7, False)])
def test_matches_diffusers_unipc(n, conditioned):
    shape = (1, 3, 4, 2, 3)
    rng = np.random.default_rng(n)
    noise = sampling.initial_noise(7, shape)
    gt = rng.standard_normal(shape).astype(np.float32) if conditioned else None
    mask = (np.arange(4) % 2 == 0).astype(np.float32).reshape(1, 1, 4, 1, 1) * np.ones((1, 1, 4, 2, 3), np.float32)
    mask = mask if conditioned else None
    coefs, fn = _toy_fields(n, shape)
    ref, ref_ts, ref_sig = _diffusers_loop(coefs, noise, n, 5.0, 2.5, gt, mask)
    np.testing.assert_array_equal(unipc.net_timesteps(n, 5.0), ref_ts)
    np.testing.assert_allclose(unipc.sigmas(n, 5.0), ref_sig, rtol=0, atol=1e-7)

    run = jax.jit(lambda noise, gt, mask: sampling.sample(fn, noise, num_steps=n, shift=5.0, guidance=2.5,
                                                          gt=gt, condition_mask=mask))
    got = np.asarray(run(noise, gt, mask))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # float32 both sides
    # a wrong solver order or grid would not pass: plain Euler on the same field lands far away
    assert np.abs(got - noise).max() > 0.1


# ----------------------------------------------------------------------------------------------------------------
# Batch, guidance, branches
# ----------------------------------------------------------------------------------------------------------------
def test_batch_of_two_equals_two_single_runs():
    shape = (2, 4, 4, 2, 3)
    noise = sampling.initial_noise(3, shape)
    gt = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    mask = np.zeros((2, 1, 4, 2, 3), np.float32)
    mask[0, :, [0, 2]] = 1.0  # sample 0: first frame of each of 2 views; sample 1: unconditioned
    coefs, _ = _toy_fields(5, shape[1:])

    def fn(x, timesteps_B_T):  # per-sample field, the same for every batch entry
        t = timesteps_B_T.astype(jnp.float32).reshape(-1, 1, 1, 1, 1) / 1000
        return tuple(a * x + b * jnp.sin(x) + c * t + d * jnp.roll(x, 1, axis=2) for a, b, c, d in coefs)

    run = jax.jit(lambda noise, gt, mask: sampling.sample(fn, noise, num_steps=9, guidance=3.0, gt=gt,
                                                          condition_mask=mask))
    both = np.asarray(run(noise, gt, mask))
    for b in range(2):
        one = np.asarray(run(noise[b:b + 1], gt[b:b + 1], mask[b:b + 1]))
        np.testing.assert_allclose(both[b:b + 1], one, rtol=0, atol=1e-6)
    assert np.abs(both[0] - both[1]).max() > 0.1


def test_guidance_zero_is_the_conditional_velocity_alone():
    shape = (1, 3, 4, 2, 3)
    noise = sampling.initial_noise(0, shape)
    _, fn = _toy_fields(2, shape)

    def cond_only(x, t):  # CFG of two identical branches is v_cond whatever the guidance
        v_cond = fn(x, t)[0]
        return v_cond, v_cond

    def run(velocity_fn, guidance):
        return np.asarray(jax.jit(lambda n: sampling.sample(velocity_fn, n, num_steps=6, guidance=guidance))(noise))

    np.testing.assert_array_equal(run(fn, 0.0), run(cond_only, 0.0))
    np.testing.assert_allclose(run(fn, 0.0), run(cond_only, 4.0), rtol=0, atol=1e-6)
    assert np.abs(run(fn, 3.0) - run(fn, 0.0)).max() > 1e-2  # guidance does act


def test_cfg_formula_and_branch_batching():
    v_c, v_u = jnp.float32(2.0), jnp.float32(0.5)
    assert float(sampling.cfg_velocity(v_c, v_u, 3.0)) == 2.0 + 3.0 * 1.5  # not v_u + g(v_c - v_u)

    def net_fn(x, timesteps_B_T, *, emb, ctrl):
        return x * emb[:, :, None, None, None] + ctrl + timesteps_B_T.reshape(-1, 1, 1, 1, 1) / 1000

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 2, 2)).astype(np.float32)
    ctrl = rng.standard_normal(x.shape).astype(np.float32)
    cond = {"emb": rng.standard_normal((2, 3)).astype(np.float32), "ctrl": ctrl}
    uncond = {"emb": rng.standard_normal((2, 3)).astype(np.float32), "ctrl": ctrl}
    t = jnp.full((2, 1), 993, jnp.int32)
    batched = sampling.branch_velocity_fn(net_fn, cond, uncond, batch_branches=True)(x, t)
    split = sampling.branch_velocity_fn(net_fn, cond, uncond, batch_branches=False)(x, t)
    for a, b, kw in zip(batched, split, (cond, uncond)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, net_fn(x, t, **kw))


def test_initial_noise_reproduces_the_case_seed(sample_case):
    """sampleA's noise is arch_invariant_rand(seed) of the reference at CP=1."""
    case = json.loads((sample_case / "case.json").read_text())
    noise = np.load(sample_case / "inputs.npz")["noise_B_C_T_H_W"]
    got = sampling.initial_noise(case["sampler"]["seed"], noise.shape)
    assert got.dtype == np.float32 and got.shape == noise.shape
    np.testing.assert_array_equal(got, noise)
    assert not np.array_equal(sampling.initial_noise(case["sampler"]["seed"] + 1, noise.shape), noise)


# ----------------------------------------------------------------------------------------------------------------
# The opt-in step cache (sampling.StepCache)


def _counted(field):
    """A velocity_fn from field(x, t) -> v (both CFG branches equal) that counts its real executions."""
    calls = []

    def velocity_fn(x, timesteps_B_T):
        jax.debug.callback(lambda: calls.append(1))
        v = field(x, timesteps_B_T.astype(jnp.float32) / 1000.0)
        return v, v

    return velocity_fn, calls


def _run(field, cache, n=20, seed=0):
    fn, calls = _counted(field)
    noise = np.random.default_rng(seed).standard_normal((1, 4, 3, 2, 2)).astype(np.float32)
    x, aux = jax.jit(lambda z: sampling.sample(fn, z, num_steps=n, guidance=2.0, aux=True, cache=cache))(noise)
    jax.block_until_ready(x)
    return np.asarray(x), np.asarray(aux["net_computed_per_step"]), len(calls)


def test_step_cache_off_is_the_exact_sampler():
    def field(x, t):
        return jnp.sin(3 * x) + t[:, :, None, None, None]

    exact, computed, calls = _run(field, None)
    off, computed_off, calls_off = _run(field, sampling.StepCache(threshold=0.0))
    np.testing.assert_array_equal(off, exact)
    assert computed.all() and computed_off.all() and calls == calls_off == 20


def test_step_cache_skips_where_the_velocity_is_steady():
    """A constant velocity field: every magnitude ratio is 1, so after the warm-up the cache skips max_skips steps,
    computes one, and so on, never within the last `final` steps; reusing a constant velocity changes nothing."""
    const = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 3, 2, 2)), jnp.float32)

    def field(x, t):
        return const + 0 * x

    cache = sampling.StepCache(threshold=0.5, max_skips=2, warmup=4, final=2)
    exact, _, _ = _run(field, None)
    got, computed, calls = _run(field, cache)
    want = [True] * 4 + [False, False, True] * 4 + [False, False] + [True] * 2
    assert computed.tolist() == want
    assert calls == sum(want) == 10  # the net really ran only on the computed steps
    np.testing.assert_allclose(got, exact, atol=1e-6)


def test_step_cache_computes_where_the_velocity_changes():
    """A field whose magnitude falls by exp(-40 dt) per step: on this grid dt >= 0.01, so |1 - r| >= 0.33 every
    step, above a 0.2 threshold -> no skip."""
    def field(x, t):
        return jnp.ones_like(x) * jnp.exp(40.0 * (t - 1.0))[:, :, None, None, None]

    _, computed, calls = _run(field, sampling.StepCache(threshold=0.2, max_skips=3, warmup=2, final=1))
    assert computed.all() and calls == 20
    _, computed, calls = _run(field, sampling.StepCache(threshold=5.0, max_skips=3, warmup=2, final=1))
    assert not computed.all() and calls == int(computed.sum()) < 20  # a loose threshold does skip


def test_step_cache_config():
    from configs import transfer2_auto_multiview as cfg_file
    from cosmos_jax.inference import pipeline

    config = cfg_file.get_config("tiny")
    assert pipeline.step_cache_from(config) is None  # off by default
    config.sampler.step_cache_threshold = 0.3
    assert pipeline.step_cache_from(config) == sampling.StepCache(threshold=0.3, max_skips=2, warmup=4, final=2)
    config.sampler.step_cache_warmup = 1  # the online ratio needs two computed steps first
    with pytest.raises(pipeline.InferenceConfigError, match="sampler: step_cache_threshold=0.3"):
        pipeline.check_config(config)
