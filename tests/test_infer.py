"""Multiview inference: the reference spec format and its errors, autoregressive frame counts, the command-line
forms, and generation end to end on the tiny config (outputs decode with the right frame counts, sizes, fps)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import transfer2_auto_multiview as cfg_file
from cosmos_jax import build, cli, infer
from cosmos_jax.data import video
from cosmos_jax.inference import pipeline, spec as spec_lib
from cosmos_jax.training import checkpoint as ckpt_lib
from tests.conftest import random_tiny_network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "assets", "multiview_example")
EXAMPLE_SPEC = os.path.join(EXAMPLE, "multiview_spec.json")
AR_SPEC = os.path.join(EXAMPLE, "multiview_autoregressive_spec.json")
TINY = f"{infer.CONFIG_FILE}:tiny"


def example(**changes) -> dict:
    data = json.load(open(EXAMPLE_SPEC))
    data.update(changes)
    return data


def write_spec(tmp_path, data, name="spec.json", example_paths=True) -> str:
    """A spec in tmp_path; the example's relative paths are made absolute (they are relative to its folder)."""
    def fix(d):
        if not example_paths or not isinstance(d, dict):
            return d
        out = dict(d)
        for key in spec_lib.VIEW_KEYS:
            if isinstance(out.get(key), dict):
                out[key] = {k: (os.path.join(EXAMPLE, v) if k.endswith("_path") and isinstance(v, str) else v)
                            for k, v in out[key].items()}
        if isinstance(out.get("prompt_path"), str):
            out["prompt_path"] = os.path.join(EXAMPLE, out["prompt_path"])
        return out

    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(fix(d)) + "\n" for d in data))
    else:
        path.write_text(json.dumps(fix(data)))
    return str(path)


def spec_error(path, overrides=None, chunk=29) -> str:
    with pytest.raises(spec_lib.SpecError) as e:
        for s in spec_lib.load_specs([path], overrides):
            spec_lib.plan_frames(s, chunk)
    return str(e.value)


# ------------------------------------------------------------------------------------------------ spec format

def test_example_spec_is_the_reference_layout():
    (s,) = spec_lib.load_specs([EXAMPLE_SPEC])
    assert s.name == "auto_multiview" and s.fps == 10 and s.seed == 0 and s.guidance == 3 and s.num_steps == 35
    assert s.num_conditional_frames == 1 and s.control_weight == 1.0 and s.save_combined_views
    assert s.active_views == list(spec_lib.VIEW_KEYS) and s.view_ids == list(range(7)) and s.primary == 0
    assert s.prompt == open(os.path.join(EXAMPLE, "prompt.txt")).read().strip()
    assert s.views["rear"].control_path == os.path.join(EXAMPLE, "world_scenario_videos", "ws_rear_tele_30fov.mp4")
    dumped = s.to_dict()
    assert list(dumped)[:3] == ["name", "prompt_path", "prompt"] and set(spec_lib.VIEW_KEYS) <= set(dumped)


def test_subset_keeps_view_ids_and_primary_falls_back(tmp_path):
    data = {"name": "x", "prompt": "p", "rear": example()["rear"], "front_tele": example()["front_tele"],
            "num_conditional_frames": 0}
    (s,) = spec_lib.load_specs([write_spec(tmp_path, data)])
    assert s.active_views == ["rear", "front_tele"] and s.view_ids == [3, 6] and s.primary == 0
    data["front_wide"] = {"control_path": example()["front_wide"]["control_path"]}
    data["cross_left"] = {"control_path": example()["cross_left"]["control_path"]}
    (s,) = spec_lib.load_specs([write_spec(tmp_path, data)])
    assert s.view_ids == [0, 3, 5, 6] and s.active_views[s.primary] == "front_wide"


def _bad_fps_video(tmp_path) -> str:
    path = str(tmp_path / "five_fps.mp4")
    video.write_video(path, np.zeros((33, 16, 16, 3), np.uint8), 5)
    return path


@pytest.mark.parametrize("case,field", [
    ("unknown_key", "colour"),
    ("unknown_view_key", "front_wide.weight"),
    ("guidance", "guidance"),
    ("control_weight", "control_weight"),
    ("missing_file", "cross_right.control_path"),
    ("fps_not_dividing", "fps"),
    ("fps_mismatch", "fps"),
    ("no_active_view", "control_path"),
    ("ar_conditional_frames", "front_wide.num_conditional_frames_per_view"),
    ("missing_input", "rear.input_path"),
    ("bad_type", "seed"),
])
def test_every_bad_field_is_named_with_its_file(tmp_path, case, field):
    data = example()
    if case == "unknown_key":
        data["colour"] = "red"
    elif case == "unknown_view_key":
        data["front_wide"] = dict(data["front_wide"], weight=1)
    elif case == "guidance":
        data["guidance"] = 8
    elif case == "control_weight":
        data["control_weight"] = 1.5
    elif case == "missing_file":
        data["cross_right"] = dict(data["cross_right"], control_path="world_scenario_videos/nope.mp4")
    elif case == "fps_not_dividing":
        data["fps"] = 3
    elif case == "fps_mismatch":
        data["rear"] = dict(data["rear"], control_path=_bad_fps_video(tmp_path))
    elif case == "no_active_view":
        data = {k: v for k, v in data.items() if k not in spec_lib.VIEW_KEYS}
    elif case == "ar_conditional_frames":
        data.update(enable_autoregressive=True)
        for k in spec_lib.VIEW_KEYS:
            data[k] = dict(data[k], num_conditional_frames_per_view=3 if k == "front_wide" else 1)
    elif case == "missing_input":
        data["rear"] = {"control_path": data["rear"]["control_path"]}
    elif case == "bad_type":
        data["seed"] = "abc"
    # the example's relative paths resolve against the spec's own folder: write it there (missing_file checks it)
    folder = tmp_path / "specs"
    shutil.copytree(EXAMPLE, folder)
    path = folder / "bad.json"
    path.write_text(json.dumps(data))
    msg = spec_error(str(path))
    assert msg.startswith(str(path)), msg
    assert f"{field}:" in msg, msg
    if case == "missing_file":
        assert str(folder / "world_scenario_videos" / "nope.mp4") in msg  # resolved relative to the spec
    if case == "fps_mismatch":
        assert "rear.control_path 5 fps" in msg and "10 fps" in msg


def test_jsonl_names_must_be_unique_and_errors_name_the_line(tmp_path):
    path = write_spec(tmp_path, [example(name="a"), example(name="b"), example(name="a")], "many.jsonl")
    msg = spec_error(path)
    assert msg.startswith(f"{path} line 3: name:") and "not unique" in msg and f"{path} line 1" in msg
    path = write_spec(tmp_path, [example(name="a"), example(name="b", guidance=-1)], "bad.jsonl")
    assert spec_error(path).startswith(f"{path} line 2: guidance:")
    assert [s.name for s in spec_lib.load_specs([write_spec(tmp_path, [example(name="a"), example(name="b")],
                                                            "ok.jsonl")])] == ["a", "b"]


def test_cli_overrides_win_over_the_file(tmp_path):
    path = write_spec(tmp_path, example(seed=5, prompt="file prompt"))
    (s,) = spec_lib.load_specs([path], {"seed": 7, "num_steps": 2, "prompt": "cli prompt"})
    assert (s.seed, s.num_steps, s.prompt) == (7, 2, "cli prompt")
    with pytest.raises(spec_lib.SpecError, match=r"--guidance=9: 9 is outside \[0, 7\]"):
        spec_lib.parse_override("guidance", "9")


# ------------------------------------------------------------------------------------------------ AR frame counts

def test_autoregressive_chunk_counts_by_hand():
    # 29-frame chunks overlapping by 1: chunk c starts at 28c; frames = 29 + 28 (N - 1)
    assert spec_lib.ar_num_chunks(3, available=100, chunk_frames=29, overlap=1) == 3
    assert spec_lib.frames_per_view(29, 1, 3) == 85
    assert spec_lib.chunk_starts(29, 1, 3) == [0, 28, 56]
    # clamp: 60 frames allow 1 + (60 - 29) // 28 = 2 chunks, 29 frames one, 56 one
    assert spec_lib.ar_num_chunks(10, available=60, chunk_frames=29, overlap=1) == 2
    assert spec_lib.ar_num_chunks(10, available=29, chunk_frames=29, overlap=1) == 1
    assert spec_lib.ar_num_chunks(10, available=56, chunk_frames=29, overlap=1) == 1
    assert spec_lib.ar_num_chunks(10, available=57, chunk_frames=29, overlap=1) == 2
    # overlap 5: steps of 24 -> 29 + 24 * 2 = 77 frames from 100
    assert spec_lib.ar_num_chunks(10, available=100, chunk_frames=29, overlap=5) == 3
    assert spec_lib.frames_per_view(29, 5, 3) == 77
    # the example's 33 frames at 10 fps: the tiny model's 5-frame chunks (overlap 1) fit 1 + 28 // 4 = 8
    (s,) = spec_lib.load_specs([AR_SPEC], {"num_chunks": 100})
    plan = spec_lib.plan_frames(s, chunk_frames=5)
    assert (plan.num_chunks, plan.frames, plan.stride, plan.available) == (8, 33, 1, 33)
    assert spec_lib.plan_frames(s, chunk_frames=29).num_chunks == 1  # the real model: one chunk from 33 frames
    (s,) = spec_lib.load_specs([AR_SPEC], {"fps": 5})  # stride 2: 16 frames -> 1 + 11 // 4 = 3 >= 2
    assert (spec_lib.plan_frames(s, 5).stride, spec_lib.plan_frames(s, 5).frames) == (2, 9)
    with pytest.raises(spec_lib.SpecError, match="chunk_overlap: 5 must be smaller than the 5-frame chunks"):
        spec_lib.plan_frames(spec_lib.load_specs([AR_SPEC], {"chunk_overlap": 5})[0], 5)
    assert [spec_lib.latent_frames(n) for n in (0, 1, 2, 4, 5, 9, 29)] == [0, 1, 1, 1, 2, 3, 8]


# ------------------------------------------------------------------------------------------------ command line

def test_seed_guide_and_reference_forms_parse_to_the_same_arguments(tmp_path):
    ckpt = tmp_path / "model_ema_bf16.pt"
    ckpt.write_bytes(b"")
    ours = infer.parse_args(["infer", "--spec", EXAMPLE_SPEC, "-o", str(tmp_path / "out"), "--checkpoint_path",
                             str(ckpt), "--config", f"{infer.CONFIG_FILE}:post_train_example",
                             "--config.mesh.num_devices=1", "--num_steps=2"])
    guide = infer.parse_args(["infer", "--params_file", EXAMPLE_SPEC, "--num_gpus=1", "--checkpoint_path", str(ckpt),
                              "--experiment", "transfer2_auto_multiview_post_train_example", "--output_dir",
                              str(tmp_path / "out"), "--num_steps", "2"])
    reference = infer.parse_args(["infer", "-i", EXAMPLE_SPEC, "-o", str(tmp_path / "out"), "--checkpoint-path",
                                  str(ckpt), "--experiment=transfer2_auto_multiview_post_train_example",
                                  "--num_gpus", "1", "--num-steps=2", "--disable_guardrails"])
    assert ours.comparable() == guide.comparable() == reference.comparable()
    assert ours.overrides == {"num_steps": 2} and ours.config.mesh.num_devices == 1 and ours.ema
    assert ours.config.variant == "post_train_example" and ours.config.data.height == 720
    default = infer.parse_args(["infer", "-i", EXAMPLE_SPEC, AR_SPEC, "-o", "out", "--checkpoint_path", str(ckpt)])
    assert default.specs == [EXAMPLE_SPEC, AR_SPEC] and default.config.variant == "post_train_example"
    for argv, pattern in [(["--spec", EXAMPLE_SPEC, "--checkpoint_path", str(ckpt)], "-o"),
                          (["--spec", EXAMPLE_SPEC, "-o", "x", "--checkpoint_path", "/nonexistent"], "/nonexistent"),
                          (["--spec", EXAMPLE_SPEC, "-o", "x", "--checkpoint_path", str(ckpt), "--guidance=8"],
                           "--guidance=8"),
                          (["--spec", EXAMPLE_SPEC, "-o", "x", "--checkpoint_path", str(ckpt), "--config.modle=1"],
                           "modle")]:
        with pytest.raises(infer.CliError, match=pattern):
            infer.parse_args(["infer"] + argv)


def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, capsys):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"")
    folder = tmp_path / "specs"
    shutil.copytree(EXAMPLE, folder)
    bad = folder / "bad.json"
    bad.write_text(json.dumps(example(fps=3)))
    out = tmp_path / "out"
    argv = ["--config", TINY, "--spec", str(bad), "-o", str(out), "--checkpoint_path", str(ckpt)]
    assert cli.run(infer.main_argv, argv) == 2  # what `python -m cosmos_jax.infer ...` does
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: fps:"), err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An Orbax checkpoint of the tiny network as `python -m cosmos_jax.train` writes it (random weights, an EMA
    that differs from the regular weights)."""
    config = cfg_file.get_config("tiny")
    cfg = build.dit_config_from(config.model)
    trainable, frozen = random_tiny_network(cfg)
    rng = np.random.default_rng(1)
    ema = jax.tree.map(lambda a: a + 0.01 * rng.standard_normal(a.shape).astype(np.float32), trainable)
    model = {"trainable": trainable, "frozen": frozen, "ema": ema}
    directory = tmp_path_factory.mktemp("tiny_job") / "checkpoints"
    with ckpt_lib.Checkpointer(directory, async_save=False) as c:
        c.save(1, {"model": jax.tree.map(jax.numpy.asarray, model)}, config=config.to_dict())
    return str(directory), model


def run_cli(argv):
    args = infer.parse_args(["infer", "--config", TINY, "--num_steps=2"] + argv)
    assert infer.main(args) == 0
    return args


def probe(path):
    info = video.probe(path)
    return info.num_frames, info.height, info.width, info.fps


def test_example_spec_end_to_end(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run_cli(["--spec", EXAMPLE_SPEC, "-o", str(out), "--checkpoint_path", tiny_ckpt[0]])
    assert sorted(os.listdir(out)) == ["auto_multiview.json", "auto_multiview.mp4", "config.json"]
    assert probe(out / "auto_multiview.mp4") == (7 * 5, 64, 96, 10.0)  # views one after another in time
    saved = json.load(open(out / "auto_multiview.json"))
    assert saved["num_steps"] == 2 and saved["guidance"] == 3 and saved["front_wide"]["control_path"].endswith(
        "ws_front_wide_120fov.mp4")
    assert json.load(open(out / "config.json"))["model"]["model_channels"] == 64


def test_autoregressive_per_view_and_grid_outputs(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run_cli(["--spec", AR_SPEC, "-o", str(out), "--checkpoint_path", tiny_ckpt[0], "--num_chunks=3",
             "--save_combined_views=false", "--fps=5"])
    name = "multiview_autoregressive"
    views = [f"{name}_{k}.mp4" for k in spec_lib.VIEW_KEYS]
    assert sorted(os.listdir(out)) == sorted(views + [f"{name}_grid.mp4", f"{name}.json", "config.json"])
    frames = 5 + 4 * 2  # 3 chunks of 5 frames overlapping by 1
    for v in views:
        assert probe(out / v) == (frames, 64, 96, 5.0)
    assert probe(out / f"{name}_grid.mp4") == (frames, 3 * 64, 3 * 96, 5.0)


def test_view_subset_jsonl_and_regular_weights(tiny_ckpt, tmp_path):
    base = {"prompt": "a road", "num_conditional_frames": 5,
            "front_wide": example()["front_wide"], "rear": example()["rear"]}
    path = write_spec(tmp_path, [dict(base, name="s0"), dict(base, name="s1", seed=1, guidance=0)], "two.jsonl")
    out = tmp_path / "out"
    run_cli(["--spec", path, "-o", str(out), "--checkpoint_path", tiny_ckpt[0], "--noema"])
    for name in ("s0", "s1"):
        assert probe(out / f"{name}.mp4") == (2 * 5, 64, 96, 10.0)
    a, b = (video.read_frames(out / f"{n}.mp4") for n in ("s0", "s1"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1  # other seed and guidance, other video


def test_training_hook_writes_reg_and_ema_samples(tiny_ckpt, tmp_path):
    config = cfg_file.get_config("tiny")
    _, model = tiny_ckpt
    rng = np.random.default_rng(1)
    batch = {"x0": rng.standard_normal((1, 16, 4, 8, 12)).astype(np.float32),
             "latent_control": rng.standard_normal((1, 16, 4, 8, 12)).astype(np.float32),
             "context": rng.standard_normal((1, 2 * 512, 48)).astype(np.float32),
             "view_indices": np.array([[0, 0, 3, 3]], np.int32)}
    frames = pipeline.sample_during_training(model, config, batch, 200, str(tmp_path), num_steps=2)
    assert set(frames) == {"reg", "ema"} and frames["reg"].shape == (5, 3 * 64, 3 * 96, 3)
    assert frames["reg"][:, 64:].max() == 0  # 2 views: the lower rows of the grid are black
    assert not np.array_equal(frames["reg"], frames["ema"])
    assert probe(tmp_path / "sample_ema_iter_000000200.mp4") == (5, 3 * 64, 3 * 96, 10.0)


def test_eight_device_mesh_generates_what_one_device_does(tiny_ckpt, tmp_path):
    """The DiT on data 2 x fsdp 2 x context 2 (the guidance branches of two copies of the sample split over the
    batch axes, context parallel inside each) and the VAE over 8 devices, against one device."""
    data = {"name": "m", "prompt": "a road", "num_conditional_frames": 5, "num_steps": 2,
            "front_wide": example()["front_wide"], "rear": example()["rear"]}
    (s,) = spec_lib.load_specs([write_spec(tmp_path, data)])
    frames = {}
    for n, mesh in ((1, dict(num_devices=1)), (8, dict(num_devices=0, data=2, fsdp=2, context=2))):
        config = cfg_file.get_config("tiny")
        config.mesh.update(mesh)
        (result,) = pipeline.run(config, [s], str(tmp_path / f"out{n}"), tiny_ckpt[0], log=lambda *_: None)
        frames[n] = result.frames.astype(np.int32)
    assert frames[1].shape == (2, 5, 64, 96, 3)
    diff = np.abs(frames[1] - frames[8])
    assert diff.mean() < 0.5, (diff.mean(), diff.max())
