"""The rectified-flow training loss (cosmos_jax/diffusion/flow.py) against the reference oracle and hand values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import fixtures_dir
from cosmos_jax.diffusion import flow
from tools import parity


@pytest.fixture(scope="module")
def loss_case():
    return fixtures_dir() / "train_loss" / "lossA"


def _toy_net(scale=0.7):
    """A deterministic stand-in for the DiT that mixes every input it gets, per sample."""
    def apply_fn(*, x_B_C_T_H_W, timesteps_B_T, crossattn_emb, latent_control_input, control_weight,
                 condition_video_input_mask_B_C_T_H_W, padding_mask, view_indices_B_T):
        b = x_B_C_T_H_W.shape[0]
        per_b = (jnp.tanh(timesteps_B_T[:, 0] / 500.0) + jnp.mean(crossattn_emb, axis=(1, 2))
                 + jnp.mean(padding_mask, axis=(1, 2, 3)) + jnp.mean(view_indices_B_T, axis=1)).reshape(b, 1, 1, 1, 1)
        return (scale * x_B_C_T_H_W + control_weight * 0.3 * latent_control_input
                + 0.5 * condition_video_input_mask_B_C_T_H_W + per_b)
    return apply_fn


def _toy_batch(seed, b=2, c=4, v=2, t=3, h=4, w=6, n_tok=8, d=5):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    return dict(
        x0=normal(b, c, v * t, h, w),
        eps=normal(b, c, v * t, h, w),
        crossattn_emb=normal(b, n_tok, d) + 1.0,
        latent_control_input=normal(b, c, v * t, h, w),
        padding_mask=rng.uniform(size=(b, 1, 8 * h, 8 * w)).astype(np.float32),
        view_indices_B_T=np.repeat(np.asarray([[0, 3]] * b), t, axis=1),
    )


def _loss(batch, u, k, keep, apply_fn=None, state_t=3, **kw):
    """Jitted training_loss -> (loss, aux, what the net received)."""
    net = apply_fn or _toy_net()

    def run(batch, u, k, keep):
        seen = {}

        def spy(**net_kw):
            seen.update(net_kw)
            return net(**net_kw)

        loss, aux = flow.training_loss(spy, batch["x0"], batch["eps"], u, k, keep,
                                       crossattn_emb=batch["crossattn_emb"],
                                       latent_control_input=batch["latent_control_input"],
                                       padding_mask=batch["padding_mask"], view_indices_B_T=batch["view_indices_B_T"],
                                       state_t=state_t, **kw)
        return loss, aux, seen

    return jax.jit(run)(batch, jnp.asarray(u, jnp.float32), jnp.asarray(k), jnp.asarray(keep))


# ----------------------------------------------------------------------------------------------------------------
def test_loss_case_a_matches_reference(loss_case, tmp_path):
    out_path = tmp_path / "loss.npz"
    parity.main(["loss", "--case", str(loss_case), "--out", str(out_path)])
    got, ref = np.load(out_path), np.load(loss_case / "output.npz")
    for name in ref.files:
        assert got[name].shape == ref[name].shape, name
    for name in ("loss", "per_sample_loss"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=0, err_msg=name)
    for name in ("v_pred", "net_out_raw"):
        assert np.max(np.abs(got[name] - ref[name])) <= 1e-4, name
    for name in ("x_t", "v_target", "net_x_input", "sigma", "timesteps", "crossattn_emb_fed"):
        scale = np.max(np.abs(ref[name]))
        assert np.max(np.abs(got[name] - ref[name])) <= 1e-6 * scale, name
    # conditioning positions: prediction == target exactly (mask from the fixture, not from our code)
    cond = np.broadcast_to(np.load(loss_case / "inputs.npz")["condition_video_input_mask_B_C_T_H_W"] > 0,
                           ref["v_pred"].shape)
    assert cond.any() and not cond.all()
    assert np.array_equal(got["v_pred"][cond], got["v_target"][cond])
    assert np.array_equal(got["v_pred"][cond], ref["v_pred"][cond])


def test_loss_batch_of_two_through_the_net(loss_case, tmp_path):
    """lossA's sample next to a second one (k = 2, text dropped): sample 0 keeps the reference's per-sample loss."""
    ins = dict(np.load(loss_case / "inputs.npz"))
    ref = np.load(loss_case / "output.npz")
    two = {}
    for name, a in ins.items():
        if name == "control_weight":
            two[name] = a
        elif name == "num_conditional_frames_B":
            two[name] = np.asarray([a[0], 2], a.dtype)
        elif name == "text_dropped_B":
            two[name] = np.asarray([a[0], True])
        elif name == "u_B":
            two[name] = np.asarray([a[0], 0.25], a.dtype)
        else:  # a second sample: lossA's conditions, another latent and noise (flipped along W)
            other = a[..., ::-1] if name in ("x0_B_C_T_H_W", "epsilon_B_C_T_H_W") else a
            two[name] = np.concatenate([a, other], axis=0)
    np.savez(tmp_path / "inputs.npz", **two)
    out_path = tmp_path / "loss.npz"
    parity.main(["loss", "--case", str(loss_case), "--inputs", str(tmp_path / "inputs.npz"), "--out", str(out_path)])
    got = np.load(out_path)
    np.testing.assert_allclose(got["per_sample_loss"][0], ref["per_sample_loss"][0], rtol=1e-5)
    np.testing.assert_allclose(got["loss"], got["per_sample_loss"].mean(), rtol=1e-6)
    assert np.max(np.abs(got["v_pred"][:1] - ref["v_pred"])) <= 1e-4
    assert np.all(got["crossattn_emb_fed"][1] == 0)
    np.testing.assert_allclose(got["sigma"][1], [5 * 0.25 / 2.0], rtol=1e-6)
    # sample 1: frames t = 0, 1 of both views (T = 2) are conditioning -> target exactly, and x0 went in
    np.testing.assert_array_equal(got["v_pred"][1], got["v_target"][1])
    np.testing.assert_array_equal(got["net_x_input"][1], two["x0_B_C_T_H_W"][1])
    assert got["per_sample_loss"][1] == 0.0


def test_shift_maps_u_to_sigma_by_hand():
    sigma, tau = flow.sigma_and_timesteps(jnp.asarray([0.5, 0.0, 1.0, 0.2], jnp.float32), shift=5.0)
    assert sigma.shape == tau.shape == (4, 1)
    # 5*0.5/(1+4*0.5) = 2.5/3; 5*0.2/(1+0.8) = 1/1.8
    np.testing.assert_allclose(np.asarray(sigma[:, 0]), [5 / 6, 0.0, 1.0, 1 / 1.8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(tau[:, 0]), [5000 / 6, 0.0, 1000.0, 1000 / 1.8], rtol=1e-6)
    s1, _ = flow.sigma_and_timesteps(jnp.asarray([0.3], jnp.float32), shift=1.0)
    np.testing.assert_allclose(np.asarray(s1), [[0.3]], rtol=1e-6)


def test_conditioning_mask_layout_by_hand():
    m = np.asarray(flow.conditioning_mask(jnp.asarray([0, 2]), n_views=2, frames_per_view=3, h=2, w=3))
    assert m.shape == (2, 1, 6, 2, 3)
    # frames view-major: [v0t0 v0t1 v0t2 v1t0 v1t1 v1t2]
    want = np.array([[0, 0, 0, 0, 0, 0],
                     [1, 1, 0, 1, 1, 0]], np.float32)
    np.testing.assert_array_equal(m, np.broadcast_to(want[:, None, :, None, None], m.shape))


def test_conditioning_positions_add_zero_error_even_with_garbage_net():
    batch = _toy_batch(0, b=2)
    shape = batch["x0"].shape

    garbage_out = np.full(shape, np.nan, np.float32)
    garbage_out[:, :, 1::3] = 1e30

    def garbage(**kw):
        return jnp.asarray(garbage_out)

    # every frame a conditioning frame (k = T): loss exactly 0 whatever the net says
    loss, aux, _ = _loss(batch, [0.3, 0.8], [3, 3], [True, True], apply_fn=garbage)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(np.asarray(aux["v_pred"]), batch["eps"] - batch["x0"])
    # k = 1: the net's input there is the clean x0 and its output is ignored there
    net_out = np.random.default_rng(1).standard_normal(shape, np.float32) * 100.0
    loss, aux, _ = _loss(batch, [0.3, 0.8], [1, 0], [True, True], apply_fn=lambda **kw: net_out)
    x0, eps, out = map(np.asarray, (batch["x0"], batch["eps"], net_out))
    v = eps - x0
    err = (out - v) ** 2
    err[0, :, [0, 3]] = 0.0  # sample 0: t=0 of both views is conditioning
    np.testing.assert_allclose(np.asarray(aux["per_sample_loss"]), err.mean(axis=(1, 2, 3, 4)), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["net_x_input"])[0, :, [0, 3]], x0[0, :, [0, 3]])
    sig = 5 * 0.8 / (1 + 4 * 0.8)
    np.testing.assert_allclose(np.asarray(aux["net_x_input"])[1], sig * eps[1] + (1 - sig) * x0[1], atol=1e-5)


def test_text_dropout_zeroes_exactly_the_dropped_samples():
    batch = _toy_batch(2, b=3)
    emb = np.asarray(batch["crossattn_emb"])
    _, aux, seen = _loss(batch, [0.5] * 3, [0] * 3, [True, False, True])
    fed = np.asarray(seen["crossattn_emb"])
    np.testing.assert_array_equal(fed[[0, 2]], emb[[0, 2]])
    assert np.all(fed[1] == 0)
    np.testing.assert_array_equal(np.asarray(aux["crossattn_emb_fed"]), fed)
    # projected contexts: the caller's "projection of zeros" replaces the dropped sample's context
    null = np.arange(emb.shape[-1], dtype=np.float32)[None, None] - 7.0
    _, _, seen = _loss(batch, [0.5] * 3, [0] * 3, [False, True, True], dropped_crossattn_emb=null)
    fed = np.asarray(seen["crossattn_emb"])
    np.testing.assert_array_equal(fed[0], np.broadcast_to(null[0], emb.shape[1:]))
    np.testing.assert_array_equal(fed[1:], emb[1:])
    # the net also receives the reference's other inputs: tau [B,1] unrounded, the mask, compute dtype
    _, _, seen = _loss(batch, [0.5, 0.2, 0.9], [1, 0, 2], [True] * 3, compute_dtype=jnp.bfloat16)
    assert seen["x_B_C_T_H_W"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(seen["timesteps_B_T"]), [[5000 / 6], [1000 / 1.8], [4500 / 4.6]],
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(seen["condition_video_input_mask_B_C_T_H_W"], np.float32)[:, 0, :, 0, 0],
                                  [[1, 0, 0, 1, 0, 0], [0] * 6, [1, 1, 0, 1, 1, 0]])


def test_draw_frequencies_match_probabilities():
    n = 40000
    d = flow.draw(jax.random.key(3), n, probs=(0.5, 0.25, 0.25), text_dropout=0.2)
    k, keep, u = (np.asarray(d[name]) for name in ("k_B", "text_keep_B", "u_B"))
    assert k.shape == keep.shape == u.shape == (n,) and u.dtype == np.float32
    freq = np.bincount(k, minlength=3) / n
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.25], atol=0.01)  # std ~0.0025
    assert abs(keep.mean() - 0.8) < 0.01
    # u = sigmoid(N(0,1)): P(u < sigmoid(1)) = Phi(1) = 0.8413, median 0.5
    assert abs(np.mean(u < 1 / (1 + np.exp(-1.0))) - 0.8413) < 0.01
    assert abs(np.median(u) - 0.5) < 0.01
    # deterministic from the key; other keys differ
    d2 = flow.draw(jax.random.key(3), n)
    assert all(np.array_equal(np.asarray(d[name]), np.asarray(d2[name])) for name in d)
    assert not np.array_equal(np.asarray(flow.draw(jax.random.key(4), n)["u_B"]), u)


def test_noise_does_not_depend_on_sharding():
    from jax.sharding import NamedSharding, PartitionSpec as P

    shape = (2, 4, 8, 4, 6)
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    sharded = jax.jit(lambda k: flow.noise(k, shape), out_shardings=NamedSharding(mesh, P(None, None, "x")))
    a = np.asarray(flow.noise(jax.random.key(5), shape))
    b = np.asarray(sharded(jax.random.key(5)))
    assert a.dtype == np.float32 and abs(a.std() - 1) < 0.1
    np.testing.assert_array_equal(a, b)


def test_batch_loss_is_mean_of_single_sample_losses():
    batch = _toy_batch(6, b=2)
    u, k, keep = [0.37, 0.81], [2, 0], [False, True]
    loss, aux, _ = _loss(batch, u, k, keep)
    singles = [_loss({n: a[i:i + 1] for n, a in batch.items()}, u[i:i + 1], k[i:i + 1], keep[i:i + 1])[0]
               for i in range(2)]
    np.testing.assert_allclose(float(loss), (float(singles[0]) + float(singles[1])) / 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["per_sample_loss"]), [float(s) for s in singles], rtol=1e-6)
    assert float(singles[0]) != float(singles[1])
