"""The training samples' unconditional branch: the built-in negative prompt on every view (the reference's
`neg_t5_text_embeddings`), from the cache (tools/precompute.py writes it) or embedded by the online encoder, raw
or projected; caches without it fall back to the dropped caption with one line saying how to add it."""

import os
import shutil

import jax
import numpy as np
import pytest

from cosmos_jax import build
from cosmos_jax.data import cache as cache_lib
from cosmos_jax.inference import pipeline
from cosmos_jax.models import dit as dit_lib
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.text import embed as text_embed
from cosmos_jax.training import trainer
from tests.conftest import random_tiny_network
from tests.test_train import tiny
from tools import make_sample_dataset, precompute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_DIR = os.path.join(REPO, "assets", "tiny_text_encoder")
SMALL = dict(data__height=32, data__width=48)  # the tiny training config at a quarter of its frame size
N_VIEWS = 7
NO_NEGATIVE = "has no negative-prompt context"


def embedded_negative(embedder) -> np.ndarray:
    """(512, 48): NEGATIVE_PROMPT through the embedder, one caption (independent of cache_lib's helpers)."""
    out = np.asarray(embedder([text_embed.NEGATIVE_PROMPT]), np.float32)
    assert out.shape == (1, 512, 48)
    return out[0]


def projected(proj: dict, x: np.ndarray) -> np.ndarray:
    """GELU(x W + b) (exact GELU), the DiT's crossattn_proj written out in numpy float64."""
    from scipy.special import erf

    y = np.asarray(x, np.float64) @ np.asarray(proj["kernel"], np.float64) + np.asarray(proj["bias"], np.float64)
    return 0.5 * y * (1.0 + erf(y / np.sqrt(2.0)))


@pytest.fixture(scope="module", autouse=True)
def quick_vae_init():
    """Random tiny-VAE weights without `wan_vae.init_params`' jit of the whole VAE (about 30 s to compile on 2 CPU
    cores): these tests need latents of the right shape, not those of a particular random VAE."""
    from cosmos_jax.models import wan_vae

    def init_params(cfg, seed=0):
        model = wan_vae.WanVAE(cfg)
        shapes = jax.eval_shape(model.init, jax.random.key(seed), jax.ShapeDtypeStruct((1, 5, 16, 16, 3), np.float32))
        rng = np.random.default_rng(seed)
        return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wan_vae, "init_params", init_params)
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two small synthetic samples in the reference layout (7 views, 5 frames)."""
    root = str(tmp_path_factory.mktemp("negative_ds") / "ds")
    make_sample_dataset.make_dataset(root, samples=2, frames=5, height=32, width=48)
    return root


def precompute_args(dataset, cache):
    return ["--dataset", dataset, "--cache", str(cache), "--tiny", "--text-dir", TEXT_DIR, "--height", "32",
            "--width", "48", "--frames", "5"]


@pytest.fixture(scope="module")
def raw_cache(dataset, tmp_path_factory):
    """A cache of `dataset` at the SMALL training shape with raw (48-wide) text contexts."""
    root = tmp_path_factory.mktemp("negative") / "cache"
    assert precompute.main(precompute_args(dataset, root)) == 0
    return root


@pytest.fixture(scope="module")
def tiny_embedder():
    return text_embed.TextEmbedder.from_dir(TEXT_DIR)  # what precompute.py builds from --text-dir


def capture_samples(monkeypatch) -> list[dict]:
    """Replace the training sample hook by a recorder of its arguments (no generation)."""
    calls = []

    def fake(model_state, config, batch, step, out_dir, **kwargs):
        calls.append(dict(kwargs, model_state=model_state, batch=batch, step=step))
        return {}

    monkeypatch.setattr(pipeline, "sample_during_training", fake)
    return calls


def one_step(tmp_path, name, **overrides):
    return tiny(tmp_path, name, **{**SMALL, "trainer__max_iter": 1, "trainer__save_iter": 1,
                                   "trainer__sample_iter": 1, "trainer__sample_steps": 1, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# (a) precompute writes the negative prompt's one-view context


def test_precompute_writes_the_raw_negative_context_and_adds_it_to_old_caches(dataset, raw_cache, tiny_embedder,
                                                                              capsys):
    path = raw_cache / cache_lib.NEGATIVE
    assert path.is_file()
    got = np.load(path)
    want = embedded_negative(tiny_embedder)
    assert got.shape == (512, 48) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    entry = np.load(raw_cache / "synthetic_0000.npz")
    assert entry["context"].shape == (N_VIEWS * 512, got.shape[1])  # as wide as the entries' contexts
    # a cache made before the file existed: a re-run with every entry cached adds it (no entry re-encoded)
    copy = raw_cache.parent / "old_cache"
    shutil.copytree(raw_cache, copy)
    os.remove(copy / cache_lib.NEGATIVE)
    mtimes = {f: os.stat(copy / f).st_mtime_ns for f in os.listdir(copy)}
    capsys.readouterr()
    assert precompute.main(precompute_args(dataset, copy)) == 0
    assert "2 already cached" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(copy / cache_lib.NEGATIVE), got)
    assert {f: os.stat(copy / f).st_mtime_ns for f in mtimes} == mtimes


def test_precompute_projects_the_negative_context_like_the_entries(dataset, tmp_path, tiny_embedder, monkeypatch):
    """--dit-weights: the negative context is projected by the DiT's crossattn_proj, as the entries' contexts (the
    real 2B net is swapped for the tiny one here)."""
    cfg = DiTConfig.tiny()
    rng = np.random.default_rng(3)
    proj = {"kernel": (0.3 * rng.standard_normal((48, 32))).astype(np.float32),
            "bias": (0.1 * rng.standard_normal(32)).astype(np.float32)}
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), dit_lib.abstract_params(cfg))
    params["crossattn_proj"] = proj
    monkeypatch.setattr(DiTConfig, "real_2b", classmethod(lambda cls: cfg))
    monkeypatch.setattr(build, "load_reference_params", lambda path, dit_cfg: (params, None))
    weights = tmp_path / "dit.pt"
    weights.write_bytes(b"stand-in")
    cache = tmp_path / "cache"
    assert precompute.main(precompute_args(dataset, cache) + ["--dit-weights", str(weights)]) == 0
    got = cache_lib.Cache(str(cache), _manifest(cache)).read_negative()
    assert got.shape == (512, 32)
    np.testing.assert_allclose(got, projected(proj, embedded_negative(tiny_embedder)), rtol=1e-4, atol=1e-5)
    entry = np.load(cache / "synthetic_0000.npz")
    assert entry["context"].shape == (N_VIEWS * 512, 32)


def _manifest(cache):
    import json

    with open(cache / cache_lib.MANIFEST) as f:
        return json.load(f)


def test_cache_negative_helpers(tmp_path):
    cache = cache_lib.Cache(str(tmp_path / "c"), {"format": 1}, create=True)
    assert cache.read_negative() is None
    arr = np.arange(512 * 3, dtype=np.float64).reshape(512, 3)
    cache.write_negative(arr)
    got = cache.read_negative()
    assert got.dtype == np.float32 and np.array_equal(got, arr)
    assert sorted(os.listdir(tmp_path / "c")) == ["manifest.json", cache_lib.NEGATIVE]
    with pytest.raises(ValueError, match="one view"):
        cache.write_negative(arr[None])
    (tmp_path / "c" / cache_lib.NEGATIVE).write_bytes(b"\x00" * 10)
    with pytest.raises(cache_lib.CacheError, match="damaged negative-prompt context"):
        cache.read_negative()


# ---------------------------------------------------------------------------------------------------------------
# (b) the trainer's sample hook gets the negative prompt on every view


def test_cached_training_samples_use_the_cached_negative_prompt(raw_cache, tiny_embedder, tmp_path, monkeypatch,
                                                                 capsys):
    calls = capture_samples(monkeypatch)
    trainer.train(one_step(tmp_path, "cached_negative", data__cache_dir=str(raw_cache), data__dataset_dir=""))
    assert len(calls) == 1 and calls[0]["step"] == 1
    uncond = calls[0]["uncond_context"]
    assert uncond.shape == (N_VIEWS * 512, 48) == calls[0]["batch"]["context"].shape[1:]
    want = embedded_negative(tiny_embedder)
    for v in range(N_VIEWS):  # the same one-view context repeated to every view
        np.testing.assert_allclose(uncond[v * 512:(v + 1) * 512], want, rtol=1e-5, atol=1e-5)
    assert NO_NEGATIVE not in capsys.readouterr().out


def test_cache_without_negative_context_falls_back_to_the_dropped_caption(raw_cache, tmp_path, monkeypatch, capsys):
    old = tmp_path / "old_cache"
    shutil.copytree(raw_cache, old)
    os.remove(old / cache_lib.NEGATIVE)
    calls = capture_samples(monkeypatch)
    capsys.readouterr()
    trainer.train(one_step(tmp_path, "no_negative", data__cache_dir=str(old), data__dataset_dir="",
                           trainer__max_iter=2, trainer__save_iter=2))
    assert len(calls) == 2 and all(c["uncond_context"] is None for c in calls)
    lines = [line for line in capsys.readouterr().out.splitlines() if NO_NEGATIVE in line]
    assert len(lines) == 1 and "tools/precompute.py" in lines[0] and str(old) in lines[0], lines


def test_online_training_samples_use_the_projected_negative_prompt(dataset, tmp_path, monkeypatch):
    calls = capture_samples(monkeypatch)
    config = one_step(tmp_path, "online_negative", data__dataset_dir=dataset)
    trainer.train(config)
    assert len(calls) == 1
    uncond = calls[0]["uncond_context"]
    assert uncond.shape == (N_VIEWS * 512, 32) == calls[0]["batch"]["context"].shape[1:]
    embedder = text_embed.TextEmbedder.from_config(config.text)
    proj = jax.tree.map(np.asarray, calls[0]["model_state"]["frozen"]["crossattn_proj"])
    want = projected(proj, embedded_negative(embedder))
    for v in range(N_VIEWS):
        np.testing.assert_allclose(uncond[v * 512:(v + 1) * 512], want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# (c) sample_during_training projects a raw uncond_context


def test_sample_hook_projects_a_raw_uncond_context(tmp_path):
    from configs import transfer2_auto_multiview as cfg_file

    config = cfg_file.get_config("tiny")
    cfg = build.dit_config_from(config.model)
    trainable, frozen = random_tiny_network(cfg)
    rng = np.random.default_rng(1)
    model = {"trainable": trainable, "frozen": frozen}
    batch = {"x0": rng.standard_normal((1, 16, 4, 8, 12)).astype(np.float32),
             "latent_control": rng.standard_normal((1, 16, 4, 8, 12)).astype(np.float32),
             "context": rng.standard_normal((1, 2 * 512, 48)).astype(np.float32),
             "view_indices": np.array([[0, 0, 3, 3]], np.int32)}
    raw = np.tile(rng.standard_normal((512, 48)).astype(np.float32), (2, 1))
    proj = jax.jit(lambda p, e: text_embed.project_context(p, e, cfg))(frozen["crossattn_proj"], raw[None])
    proj = np.asarray(proj)
    assert proj.shape == (1, 1024, 32)

    def run(uncond):
        return pipeline.sample_during_training(model, config, batch, 1, str(tmp_path), num_steps=2,
                                               uncond_context=uncond)["reg"]

    from_raw, from_proj, from_proj2d, dropped = run(raw), run(proj), run(proj[0]), run(None)
    np.testing.assert_array_equal(from_raw, from_proj)
    np.testing.assert_array_equal(from_proj2d, from_proj)
    assert not np.array_equal(from_raw, dropped)  # the unconditional branch does use it
    with pytest.raises(ValueError, match="uncond_context of shape"):
        run(raw[:512])
