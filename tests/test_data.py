"""Dataset layout, validation errors, reference sample construction, Grain iterator state, the shipped dataset."""

import json
import os
import shutil

import numpy as np
import pytest

from cosmos_jax.data import layout, pipeline, video
from tools import make_sample_dataset, validate_dataset

SPEC = layout.SampleSpec(height=64, width=112)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mv") / "ds")
    make_sample_dataset.make_dataset(root, samples=3, frames=31, height=48, width=80)
    return root


@pytest.fixture
def broken(dataset, tmp_path):
    root = str(tmp_path / "broken")
    shutil.copytree(dataset, root)
    return root


def test_sample_matches_the_reference_layout(dataset):
    samples = layout.index_dataset(dataset, SPEC)
    assert [s.name for s in samples] == ["synthetic_0000", "synthetic_0001", "synthetic_0002"]
    s = layout.load_sample(samples[1], SPEC)
    assert s["video"].shape == s["control_input_hdmap_bbox"].shape == (7 * 29, 64, 112, 3)
    assert s["video"].dtype == np.uint8 and s["padding_mask"].shape == (1, 64, 112)
    assert list(s["view_indices"]) == [v for v in range(7) for _ in range(29)]
    assert list(s["frame_indices"]) == list(range(29)) and float(s["fps"]) == 10.0
    caption = json.load(open(samples[1].caption_path))["caption"]
    # reference literals (predict2_multiview/datasets/multiview.py DEFAULT_CAPTION_PREFIXES, L63-71):
    # f"{prefix} {caption}" on camera_front_wide_120fov, f"{prefix} " on every other camera
    assert list(s["ai_caption"]) == [
        "The video is captured from a camera mounted on a car. The camera is facing forward. " + caption,
        "The video is captured from a camera mounted on a car. The camera is facing to the right. ",
        "The video is captured from a camera mounted on a car. The camera is facing the rear right side. ",
        "The video is captured from a camera mounted on a car. The camera is facing backwards. ",
        "The video is captured from a camera mounted on a car. The camera is facing the rear left side. ",
        "The video is captured from a camera mounted on a car. The camera is facing to the left. ",
        "The video is captured from a telephoto camera mounted on a car. The camera is facing forward. ",
    ]
    # view-major: frames [v*29, (v+1)*29) are camera v, resized as the reference does
    v = 3
    want = video.resize(video.read_frames(samples[1].controls[v], range(29)), (64, 112))
    np.testing.assert_array_equal(s["control_input_hdmap_bbox"][v * 29:(v + 1) * 29], want)


def test_stride_and_custom_cameras(dataset):
    spec = layout.SampleSpec(cameras=("camera_front_wide_120fov", "camera_rear_tele_30fov"), num_frames=5, stride=3,
                             height=32, width=48)
    s = layout.load_sample(layout.index_dataset(dataset, spec)[0], spec)
    assert s["video"].shape == (10, 32, 48, 3) and list(s["frame_indices"]) == [0, 3, 6, 9, 12]
    assert list(s["view_indices_selection"]) == [0, 3] and float(s["fps"]) == pytest.approx(10 / 3)
    rig = layout.SampleSpec(cameras=("camera_front_wide_120fov", "roof_cam"), view_ids=(0, 3))
    assert rig.view_ids == (0, 3)
    with pytest.raises(ValueError, match="roof_cam"):
        layout.SampleSpec(cameras=("camera_front_wide_120fov", "roof_cam"))
    with pytest.raises(layout.DatasetError, match=r"ftheta_camera_front_wide_120fov/synthetic_0000\.mp4: 31 frames"):
        layout.index_dataset(dataset, layout.SampleSpec(num_frames=29, stride=2))


def _rewrite(path, frames=None, fps=10.0):
    clip = video.read_frames(path)
    video.write_video(path, clip[:frames] if frames else clip, fps)


@pytest.mark.parametrize("case,pattern", [
    ("missing_control", r"control_input_hdmap_bbox/ftheta_camera_rear_left_70fov/synthetic_0001\.mp4: missing"),
    ("no_caption_field", r"captions/ftheta_camera_front_wide_120fov/synthetic_0001\.json: no string field"),
    ("fps_mismatch", r"control_input_hdmap_bbox/ftheta_camera_cross_left_120fov/synthetic_0001\.mp4: control video "
                     r"fps 12 differs"),
    ("too_short", r"videos/ftheta_camera_front_tele_30fov/synthetic_0001\.mp4: 20 frames, the sample needs 29"),
    ("undecodable", r"videos/ftheta_camera_rear_tele_30fov/synthetic_0001\.mp4: cannot open"),
])
def test_bad_samples_name_the_file(broken, case, pattern):
    name = "synthetic_0001"
    if case == "missing_control":
        os.remove(os.path.join(broken, "control_input_hdmap_bbox", "ftheta_camera_rear_left_70fov", f"{name}.mp4"))
    elif case == "no_caption_field":
        with open(os.path.join(broken, "captions", "ftheta_camera_front_wide_120fov", f"{name}.json"), "w") as f:
            json.dump({"text": "x"}, f)
    elif case == "fps_mismatch":
        _rewrite(os.path.join(broken, "control_input_hdmap_bbox", "ftheta_camera_cross_left_120fov", f"{name}.mp4"),
                 fps=12.0)
    elif case == "too_short":
        _rewrite(os.path.join(broken, "videos", "ftheta_camera_front_tele_30fov", f"{name}.mp4"), frames=20)
    elif case == "undecodable":
        with open(os.path.join(broken, "videos", "ftheta_camera_rear_tele_30fov", f"{name}.mp4"), "wb") as f:
            f.write(b"\x00" * 4096)
    with pytest.raises(layout.DatasetError, match=pattern):
        layout.index_dataset(broken, SPEC)
    with pytest.warns(UserWarning, match=f"skipping sample {name}"):
        kept = layout.index_dataset(broken, SPEC, skip_bad=True)
    assert [s.name for s in kept] == ["synthetic_0000", "synthetic_0002"]


def test_validate_tool_reports_every_problem(broken, capsys):
    os.remove(os.path.join(broken, "videos", "ftheta_camera_cross_right_120fov", "synthetic_0000.mp4"))
    os.remove(os.path.join(broken, "captions", "ftheta_camera_front_wide_120fov", "synthetic_0002.json"))
    assert validate_dataset.main([broken]) == 1
    out = capsys.readouterr().out
    assert "videos/ftheta_camera_cross_right_120fov/synthetic_0000.mp4: missing" in out
    assert "synthetic_0002.mp4: no caption" in out
    assert "2 samples, 1 usable, 1 unusable" in out


def test_shipped_sample_dataset_is_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "assets", "multiview_hdmap_posttrain_dataset")
    assert validate_dataset.main([root]) == 0
    assert len(layout.index_dataset(root)) == 3


def _keys(it, n):
    return [(str(b["__key__"][0]), int(b["video"].sum() % 100003)) for b in (next(it) for _ in range(n))]


def test_grain_iterator_resumes_from_saved_state(dataset):
    source = pipeline.MultiviewSource(layout.index_dataset(dataset, SPEC), layout.SampleSpec(height=32, width=48))
    cfg = pipeline.LoaderConfig(batch_size=1, seed=3, read_threads=2)
    it = iter(pipeline.make_dataset(source, cfg))
    first = _keys(it, 2)
    state = pipeline.iterator_state(it)
    expected = _keys(it, 4)  # crosses an epoch boundary (3 samples)
    again = iter(pipeline.make_dataset(source, cfg))
    pipeline.restore_iterator(again, state)
    assert _keys(again, 4) == expected
    epoch = [k for k, _ in first + expected[:1]]
    assert sorted(epoch) == ["synthetic_0000", "synthetic_0001", "synthetic_0002"]  # a permutation per epoch
    # two processes with 1 sample each load exactly the rows of the 2-sample global batches of one process
    one = [[str(k) for k in b["__key__"]] for b in pipeline.make_dataset(
        source, pipeline.LoaderConfig(batch_size=2, num_epochs=2, read_threads=1))]
    shards = [[str(b["__key__"][0]) for b in pipeline.make_dataset(
        source, pipeline.LoaderConfig(batch_size=1, num_epochs=2, read_threads=1), process_index=p, process_count=2)]
        for p in range(2)]
    assert len(one) == 3 and [list(r) for r in zip(*shards)] == one
    assert sorted(one[0] + one[1] + one[2]) == sorted(["synthetic_0000", "synthetic_0001", "synthetic_0002"] * 2)


def test_cache_round_trip_equals_online_path_and_stale_is_refused(dataset, tmp_path):
    import dataclasses

    import jax
    import jax.numpy as jnp

    from cosmos_jax.data import cache as cache_lib
    from cosmos_jax.models import dit as dit_lib
    from cosmos_jax.models import wan_vae
    from cosmos_jax.models.dit_config import DiTConfig
    from cosmos_jax.parallel import mesh as mesh_lib
    from cosmos_jax.text import embed as text_embed
    from tests import tiny_qwen

    spec = layout.SampleSpec(num_frames=5, height=32, width=48)
    files = layout.index_dataset(dataset, spec)
    vae_cfg = wan_vae.WanVAEConfig.tiny(dtype=jnp.float32)
    vae_params = wan_vae.init_params(vae_cfg, seed=1)
    text_dir = str(tmp_path / "qwen")
    tiny_qwen.build(text_dir)
    embedder = text_embed.TextEmbedder.from_dir(text_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    dit_cfg = DiTConfig.tiny(crossattn_proj_in_channels=embedder.cfg.embedding_dim)
    proj = dit_lib._crossattn_proj(dit_cfg).init(jax.random.key(0), jnp.zeros((1, 1, 192)))["params"]
    expected = cache_lib.producer(vae_cfg=vae_cfg, vae_weights="", text_cfg=embedder.cfg, text_dir=text_dir,
                                  projected_by="", spec=spec)
    cache = cache_lib.Cache(str(tmp_path / "cache"), expected, create=True)
    mesh = mesh_lib.make_mesh(data=8, fsdp=1)  # 14 videos padded to 16, split over the 8 fake devices
    with jax.default_matmul_precision("highest"):
        for f in files[:2]:
            cache.write(f.name, cache_lib.encode_entry(layout.load_sample(f, spec), vae_params=vae_params,
                                                       vae_cfg=vae_cfg, n_views=7, embedder=embedder,
                                                       proj_params=proj, dit_cfg=dit_cfg, mesh=mesh))
        # online path for one sample, view by view
        sample = layout.load_sample(files[1], spec)
        v = 4
        x = wan_vae.uint8_to_unit(jnp.asarray(sample["control_input_hdmap_bbox"][v * 5:(v + 1) * 5])[None],
                                  jnp.float32)
        online_latent = np.asarray(wan_vae.encode(vae_params, x, vae_cfg))[0]
        online_ctx = np.asarray(text_embed.project_context(
            proj, jnp.asarray(embedder([sample["ai_caption"][v]])), dit_cfg))[0]
    src = cache_lib.CachedSource(cache_lib.Cache(str(tmp_path / "cache"), expected), [f.name for f in files[:2]])
    entry = src[1]
    assert entry["latent"].shape == (7, 2, 4, 6, 16) and entry["context"].shape == (7 * 512, 32)
    np.testing.assert_allclose(entry["latent_control"][v], online_latent, atol=1e-5)
    np.testing.assert_allclose(entry["context"][v * 512:(v + 1) * 512], online_ctx, atol=1e-5)
    assert list(entry["view_indices_selection"]) == list(range(7)) and str(entry["__key__"]) == files[1].name
    # stale / foreign / incomplete caches are refused with the reason
    stale = cache_lib.producer(vae_cfg=dataclasses.replace(vae_cfg, dim=16), vae_weights="", text_cfg=embedder.cfg,
                               text_dir=text_dir, projected_by="", spec=spec)
    with pytest.raises(cache_lib.CacheError, match=r"manifest\.json.*\n.*vae\.config\.dim: cache 8 vs now 16"):
        cache_lib.Cache(str(tmp_path / "cache"), stale)
    with pytest.raises(cache_lib.CacheError, match="synthetic_0002.npz"):
        cache_lib.CachedSource(cache, [f.name for f in files])
    with pytest.raises(cache_lib.CacheError, match="missing"):
        cache_lib.Cache(str(tmp_path / "nothing"), expected)


def test_precompute_tool_is_resumable_and_refuses_other_settings(tmp_path, capsys):
    from cosmos_jax.data import cache as cache_lib
    from tools import precompute

    root = os.path.join(os.path.dirname(__file__), "..", "assets", "multiview_hdmap_posttrain_dataset")
    args = ["--dataset", root, "--cache", str(tmp_path / "c"), "--tiny", "--height", "32", "--width", "48",
            "--frames", "5"]
    assert precompute.main(args) == 0
    assert sorted(os.listdir(tmp_path / "c")) == ["manifest.json", "synthetic_0000.npz", "synthetic_0001.npz",
                                                  "synthetic_0002.npz"]
    assert precompute.main(args) == 0
    assert "3 already cached" in capsys.readouterr().out
    with pytest.raises(cache_lib.CacheError, match="spec.num_frames: cache 5 vs now 9"):
        precompute.main(args[:-1] + ["9"])


def test_worker_processes_give_the_same_batches(dataset):
    source = pipeline.MultiviewSource(layout.index_dataset(dataset, SPEC), layout.SampleSpec(height=32, width=48))
    cfg = dict(batch_size=1, seed=5, num_epochs=1, read_threads=1)
    local = [str(b["__key__"][0]) for b in pipeline.make_dataset(source, pipeline.LoaderConfig(**cfg))]
    it = pipeline.make_dataset(source, pipeline.LoaderConfig(**cfg, num_workers=2))
    assert [str(b["__key__"][0]) for b in it] == local


@pytest.mark.parametrize("workers", [0, 1])
def test_grain_iterator_state_lives_in_an_orbax_training_checkpoint(dataset, tmp_path, workers):
    import numpy as np
    import orbax.checkpoint as ocp

    source = pipeline.MultiviewSource(layout.index_dataset(dataset, SPEC), layout.SampleSpec(height=32, width=48))
    cfg = pipeline.LoaderConfig(batch_size=1, seed=5, num_workers=workers, read_threads=1, prefetch=1)
    it = iter(pipeline.make_dataset(source, cfg))
    _keys(it, 2)
    state = {"step": np.array(2, np.int32), "w": np.arange(6, dtype=np.float32)}
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("state", "data")) as mgr:
        mgr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=pipeline.checkpoint_save_args(it)))
        mgr.wait_until_finished()
    expected = _keys(it, 4)
    assert _keys(iter(pipeline.make_dataset(source, cfg)), 4) != expected  # a fresh iterator starts elsewhere
    again = iter(pipeline.make_dataset(source, cfg))
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("state", "data")) as mgr:
        assert mgr.latest_step() == 2
        restored = mgr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                          data=pipeline.checkpoint_restore_args(again)))
    np.testing.assert_array_equal(restored["state"]["w"], state["w"])
    assert _keys(again, 4) == expected
