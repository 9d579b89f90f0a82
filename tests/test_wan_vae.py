"""The Wan2.1 VAE against the reference PyTorch outputs, chunking invariance, shape checks, weight import."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools import parity
from cosmos_jax.models import wan_vae
from cosmos_jax.weights import vae_keymap

LATENT_TOL, RECON_TOL, INTER_TOL = 1e-5, 5e-5, 2e-5  # wan_vae/README.md suggested fp32 tolerances


def test_case_a_matches_reference(vae_case_a):
    out = parity.run_vae_case(str(vae_case_a))
    ref = np.load(vae_case_a / "io.npz")
    for key, tol in (("mu_raw", LATENT_TOL), ("logvar_raw", LATENT_TOL), ("latent", LATENT_TOL),
                     ("recon", RECON_TOL)):
        assert out[key].shape == ref[key].shape, key
        err = np.max(np.abs(out[key] - ref[key]))
        assert err <= tol, f"{key}: max |diff| {err}"


def test_case_a_intermediates_match_reference(vae_case_a):
    mine = parity.vae_case_intermediates(str(vae_case_a))
    ref = np.load(vae_case_a / "intermediates.npz")
    assert len(ref.files) >= 10
    for name in ref.files:
        got = mine[parity.vae_intermediate_key(name)]
        assert got.shape == ref[name].shape, name
        err = np.max(np.abs(got - ref[name]))
        assert err <= INTER_TOL, f"{name}: max |diff| {err}"


def test_parity_cli_writes_outputs(vae_case_a, tmp_path):
    out_path = tmp_path / "vae.npz"
    parity.main(["vae", "--case", str(vae_case_a), "--out", str(out_path)])
    out, ref = np.load(out_path), np.load(vae_case_a / "io.npz")
    assert np.max(np.abs(out["latent"] - ref["latent"])) <= LATENT_TOL
    assert np.max(np.abs(out["recon"] - ref["recon"])) <= RECON_TOL


def test_latent_scale_is_the_reference_bf16_constants(vae_case_a):
    mean, inv_std = wan_vae.latent_scale()
    ref = np.load(vae_case_a / "io.npz")
    np.testing.assert_array_equal(mean, ref["scale_mean"])
    np.testing.assert_array_equal(inv_std, ref["scale_inv_std"])


# ---------------------------------------------------------------------------------------------------------------
# Chunked == whole clip, for any chunking, batch split and conv formulation


@pytest.fixture(scope="module")
def tiny():
    cfg = wan_vae.WanVAEConfig.tiny(dtype=jnp.float32)
    params = wan_vae.init_params(cfg, seed=3)
    # random (non-zero) gammas and biases so every path matters
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape, np.float32), params)
    x = jax.random.uniform(jax.random.key(1), (2, 13, 16, 24, 3), jnp.float32, -1, 1)
    return cfg, params, x


def _run(cfg, params, x, **kw):
    c = dataclasses.replace(cfg, **kw)
    with jax.default_matmul_precision("highest"):
        lat = jax.jit(wan_vae.encode, static_argnums=2)(params, x, c)
        rec = jax.jit(wan_vae.decode, static_argnums=2)(params, lat, c)
    return np.asarray(lat), np.asarray(rec)


def test_chunked_equals_whole_clip(tiny):
    cfg, params, x = tiny
    lat0, rec0 = _run(cfg, params, x, encode_chunk=0, decode_chunk=0)
    assert lat0.shape == (2, 4, 2, 3, 16) and rec0.shape == x.shape
    # 4-frame chunks (scan), 8-frame chunks (scan + 4-frame tail), per-view batches, 3-D conv formulation
    for kw in (dict(encode_chunk=4, decode_chunk=1), dict(encode_chunk=8, decode_chunk=2),
               dict(batch_chunk=1), dict(conv_impl="conv3d")):
        lat, rec = _run(cfg, params, x, **kw)
        assert np.max(np.abs(lat - lat0)) <= 1e-5, kw
        assert np.max(np.abs(rec - rec0)) <= 5e-5, kw


def test_batch_chunks_cover_every_video():
    """Every video is processed once, in order, in a group of the expected size (the function adds 100 x the size of
    the group it was called on, so a wrong grouping changes the result)."""
    x = jnp.arange(7 * 2.0).reshape(7, 2)
    for bc, groups in ((0, [7] * 7), (1, [1] * 7), (2, [2] * 6 + [1]), (3, [3] * 6 + [1]), (7, [7] * 7),
                       (9, [7] * 7)):
        got = wan_vae._over_batch(lambda a: a * 2 + 100 * a.shape[0], x, bc)
        np.testing.assert_array_equal(got, x * 2 + 100 * np.asarray(groups, np.float32)[:, None], err_msg=str(bc))


def test_fold2d_memory_fallback_is_the_same_conv(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (2, 7, 8, 12, 5))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 5, 6))
    with jax.default_matmul_precision("highest"):
        for stride in (1, 2):
            conv = lambda impl: wan_vae._conv(x, k, strides=(stride, 1, 1), padding=((1, 1), (1, 1)), impl=impl)  # noqa
            a = conv("fold2d")
            monkeypatch.setattr(wan_vae, "FOLD2D_MAX_BYTES", 0)
            b = conv("fold2d")
            monkeypatch.undo()
            assert a.shape == (2, (7 - 3) // stride + 1, 8, 12, 6)
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_bf16_stays_close_to_fp32(tiny):
    cfg, params, x = tiny
    lat32, rec32 = _run(cfg, params, x)
    lat16, rec16 = _run(cfg, params, x, dtype=jnp.bfloat16)
    assert lat16.dtype == np.float32 and rec16.dtype == np.float32
    assert 0 < np.max(np.abs(lat16 - lat32)) < 0.1  # wan_vae.md §7: reference bf16 vs fp32 ~0.02 on latents
    assert np.sqrt(np.mean((rec16 - rec32) ** 2)) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# Bad input is refused, never silently truncated


@pytest.mark.parametrize("shape,msg", [((1, 8, 16, 16, 3), "4k\\+1"), ((1, 12, 16, 16, 3), "4k\\+1"),
                                       ((1, 5, 20, 16, 3), "multiples of 8"), ((1, 5, 16, 16, 4), "channels-last"),
                                       ((5, 16, 16, 3), "channels-last")])
def test_invalid_pixel_shapes_raise(tiny, shape, msg):
    cfg, params, _ = tiny
    with pytest.raises(wan_vae.VAEShapeError, match=msg):
        wan_vae.encode(params, jnp.zeros(shape), cfg)


def test_invalid_latents_and_configs_raise(tiny):
    cfg, params, x = tiny
    with pytest.raises(wan_vae.VAEShapeError, match="latents"):
        wan_vae.decode(params, jnp.zeros((1, 2, 2, 2, 8)), cfg)
    with pytest.raises(ValueError, match="encode_chunk"):
        wan_vae.WanVAEConfig(encode_chunk=6)
    with pytest.raises(ValueError, match="conv_impl"):
        wan_vae.WanVAEConfig(conv_impl="cudnn")
    with pytest.raises(ValueError, match="attn_scales"):
        wan_vae.WanVAEConfig.from_reference_kwargs({"dim": 8, "attn_scales": [0.5]})


# ---------------------------------------------------------------------------------------------------------------
# Weights: reference key names, shapes, errors


def test_real_config_has_the_reference_keys():
    shapes = vae_keymap.reference_shapes(wan_vae.WanVAEConfig.real())
    assert len(shapes) == 194
    assert sum(int(np.prod(s)) for s in shapes.values()) == 126_892_531  # wan_vae.md §8
    assert shapes["encoder.conv1.weight"] == (96, 3, 3, 3, 3)
    assert shapes["encoder.downsamples.5.time_conv.weight"] == (192, 192, 3, 1, 1)
    assert shapes["encoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert shapes["encoder.middle.1.to_qkv.weight"] == (1152, 384, 1, 1)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["decoder.upsamples.4.shortcut.weight"] == (384, 192, 1, 1, 1)
    assert shapes["decoder.upsamples.11.resample.1.weight"] == (96, 192, 3, 3)
    assert shapes["decoder.head.2.weight"] == (3, 96, 3, 3, 3)
    assert shapes["conv1.weight"] == (32, 32, 1, 1, 1) and shapes["conv2.weight"] == (16, 16, 1, 1, 1)


def test_state_dict_round_trip_and_pt_file(vae_case_a, tmp_path):
    import torch

    from cosmos_jax.weights import torch_io

    state = torch_io.load_state_dict(vae_case_a / "weights.safetensors")
    cfg = vae_keymap.infer_config(state, dtype=jnp.float32)
    assert cfg.dim == 8 and cfg.z_dim == 16
    back = vae_keymap.flax_to_reference(vae_keymap.reference_to_flax(state, cfg))
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    # the released tokenizer.pth is a torch.save'd state dict
    pt = tmp_path / "tokenizer.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pt)
    params, cfg2 = vae_keymap.load_vae_params(pt, dtype=jnp.float32)
    assert cfg2 == cfg
    ref = vae_keymap.reference_to_flax(state, cfg)
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_mismatched_checkpoints_name_the_keys(vae_case_a):
    from cosmos_jax.weights import torch_io

    state = torch_io.load_state_dict(vae_case_a / "weights.safetensors")
    cfg = vae_keymap.infer_config(state)
    broken = dict(state)
    del broken["decoder.head.2.bias"]
    broken["decoder.extra.weight"] = np.zeros(3, np.float32)
    broken["encoder.middle.1.to_qkv.weight"] = np.zeros((5, 5, 1, 1), np.float32)
    with pytest.raises(vae_keymap.VAEWeightsError) as e:
        vae_keymap.reference_to_flax(broken, cfg, source="tok.pth")
    msg = str(e.value)
    assert "tok.pth" in msg and "decoder.head.2.bias" in msg and "decoder.extra.weight" in msg
    assert "encoder.middle.1.to_qkv.weight" in msg
    with pytest.raises(vae_keymap.VAEWeightsError, match="dim=96"):
        vae_keymap.reference_to_flax(state, wan_vae.WanVAEConfig.real())


# ---------------------------------------------------------------------------------------------------------------
# FLOP count used by the benchmark, and pixel conversions


def test_flop_count_matches_the_spec():
    cfg = wan_vae.WanVAEConfig.real()
    enc = wan_vae.flops(cfg, 93, 704, 1280, "encode")
    dec = wan_vae.flops(cfg, 24, 88, 160, "decode")
    assert abs(enc / 428.06e12 - 1) < 1e-3 and abs(dec / 717.10e12 - 1) < 1e-3  # wan_vae.md §10
    per_frame = (wan_vae.flops(cfg, 5, 64, 64, "encode") - wan_vae.flops(cfg, 1, 64, 64, "encode")) / 4 / 4096
    assert abs(per_frame / 5.003e6 - 1) < 1e-3


def test_pixel_conversions():
    u8 = jnp.arange(256, dtype=jnp.uint8)
    unit = wan_vae.uint8_to_unit(u8, jnp.float32)
    assert float(unit[0]) == -1.0 and float(unit[-1]) == 1.0
    np.testing.assert_array_equal(wan_vae.unit_to_uint8(unit), u8)
    assert list(np.asarray(wan_vae.unit_to_uint8(jnp.array([-3.0, 3.0])))) == [0, 255]  # clamped, not wrapped
    assert wan_vae.latent_frames(29) == 8 and wan_vae.pixel_frames(8) == 29
