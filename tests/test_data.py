"""Dataset layout, validation errors, reference sample construction, Grain iterator state, the shipped dataset."""

import json
import os
import shutil

import numpy as np
import pytest

from cosmos_jax.data import cameras as cams
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
    assert s["ai_caption"][0] == cams.CAPTION_PREFIXES["camera_front_wide_120fov"] + " " + caption
    assert s["ai_caption"][2] == cams.CAPTION_PREFIXES["camera_rear_right_70fov"] + " "
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
    # process shards are disjoint and cover the dataset
    shards = [[str(b["__key__"][0]) for b in pipeline.make_dataset(
        source, pipeline.LoaderConfig(batch_size=1, num_epochs=1, read_threads=1), process_index=p, process_count=2)]
        for p in range(2)]
    assert sorted(shards[0] + shards[1]) == ["synthetic_0000", "synthetic_0001", "synthetic_0002"]
