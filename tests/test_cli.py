"""Every command line tool: `--help` documents every flag and exits 0; bad input (a bad flag, a missing file, a
malformed dataset / spec / checkpoint / case, a config typo) is ONE line `error: ...` naming the file or field on
stderr, exit status 2, no traceback; `--debug` shows the traceback; outputs are written atomically.

Most cases run in-process through `cli.run(main, argv)` - exactly what each tool's `__main__` does
(`cli.entry(main)`); one subprocess per tool checks the real command line (CLI start-up imports jax, ~2 s each).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cosmos_jax import cli, forward, infer, train
from tools import export, parity, precompute, validate_dataset, vae_roundtrip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = os.path.join(REPO, "assets", "multiview_hdmap_posttrain_dataset")
EXAMPLE_SPEC = os.path.join(REPO, "assets", "multiview_example", "multiview_spec.json")
TINY = f"{cli.CONFIG_FILE}:tiny"
VIDEO = os.path.join(DATASET, "videos", "ftheta_camera_front_wide_120fov", "synthetic_0000.mp4")
MAINS = {"train": train.main, "infer": infer.main_argv, "forward": forward.main, "export": export.main,
         "precompute": precompute.main, "validate_dataset": validate_dataset.main, "parity": parity.main,
         "vae_roundtrip": vae_roundtrip.main}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def in_process(capsys, tool: str, *argv, code: int = 2) -> str:
    """`cli.run(main, argv)` of a tool; asserts the exit status and one error line; returns the line."""
    assert cli.run(MAINS[tool], [str(a) for a in argv]) == code
    return one_error_line(capsys.readouterr().err)


def command(*argv, code: int = 2, env=None) -> str:
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    return one_error_line(proc.stderr)


# ------------------------------------------------------------------------------------------------ --help

def test_help_exits_0_and_documents_every_flag(capsys, monkeypatch):
    parsers = []
    monkeypatch.setattr(cli.ArgumentParser, "print_help", lambda self, file=None: parsers.append(self))
    for tool, main in MAINS.items():
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code in (0, None), tool
        out = capsys.readouterr().out
        if tool in ("train", "infer", "forward"):  # absl flags: listed with their help; the config keys' home
            assert "flags:" in out and "--[no]debug:" in out and "--[no]print_config:" in out, tool
            assert "no help available" not in out and "configs/transfer2_auto_multiview.py" in out, tool
    import argparse

    seen = set()
    for p in parsers:  # argparse tools: every option and positional has help text, sub-commands included
        todo = [p]
        while todo:
            q = todo.pop()
            for a in q._actions:
                if isinstance(a, argparse._SubParsersAction):
                    todo += list(a.choices.values())
                else:
                    assert a.help, (q.prog, a.option_strings or a.dest)
                    seen.add(a.dest)
    assert {"debug", "src", "dataset", "case", "video", "frames", "cameras", "progress"} <= seen


@pytest.mark.parametrize("argv", [["-m", "cosmos_jax.forward", "--help"],
                                  ["tools/parity.py", "dit", "--help"],
                                  ["tools/precompute.py", "--help"]])
def test_help_on_the_command_line(argv):
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "debug" in proc.stdout and not proc.stderr.strip(), proc.stderr


# ------------------------------------------------------------------------------------------------ config entry points

def test_config_typos_and_bad_configs_name_the_field(capsys):
    for tool in ("train", "forward", "infer"):
        msg = in_process(capsys, tool, "--config.modle.dtype=float32")
        assert msg == "error: --config.modle.dtype: unknown config field config.modle (did you mean config.model?)"
        msg = in_process(capsys, tool, "--config", TINY, "--config.model.dtyp=float32")
        assert "config.model.dtyp (did you mean config.model.dtype?)" in msg
    assert "config.zzz (config has: data, ema," in in_process(capsys, "train", "--config.zzz=1")
    msg = in_process(capsys, "train", "--config.model.num_blocks=abc")
    assert "--config.model.num_blocks=abc" in msg and "invalid literal for int()" in msg
    assert "no such config file 'nope.py'" in in_process(capsys, "forward", "--config=nope.py:tiny")
    assert "unknown config variant 'tinyy'" in in_process(capsys, "train", f"--config={cli.CONFIG_FILE}:tinyy")
    assert "Unknown command line flag 'bogus'" in in_process(capsys, "forward", "--bogus")
    assert "unexpected arguments ['extra']" in in_process(capsys, "train", "extra")


def test_print_config_on_every_config_entry_point(capsys):
    for tool in ("train", "forward", "infer"):
        assert cli.run(MAINS[tool], ["--config", TINY, "--config.model.num_blocks=2", "--print_config"]) == 0
        out = capsys.readouterr().out
        assert "num_blocks: 2" in out and "variant: tiny" in out, tool


def test_config_typo_on_the_command_line():
    msg = command("-m", "cosmos_jax.train", "--config.modle.dtype=float32")
    assert msg == "error: --config.modle.dtype: unknown config field config.modle (did you mean config.model?)"


def test_train_bad_input(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COSMOS_JAX_OUTPUT_ROOT", str(tmp_path))
    assert in_process(capsys, "train", "--config.data.dataset_dir=/nonexistent") == \
        "error: data.dataset_dir=/nonexistent: no such directory"
    msg = in_process(capsys, "train", "--config.model.weights=/nonexistent/w.pt")
    assert msg == "error: model.weights=/nonexistent/w.pt: no such file or directory"
    with pytest.raises(ValueError, match="data.dataset_dir=/nonexistent"):
        cli.run(train.main, ["--config.data.dataset_dir=/nonexistent", "--debug"])


def test_forward_bad_weights_and_demo_output(capsys, tmp_path):
    junk = tmp_path / "w.pt"
    junk.write_bytes(b"not a checkpoint")
    assert str(junk) in in_process(capsys, "forward", f"--config.model.weights={junk}")
    assert "/nonexistent.pt: no such weight file" in in_process(capsys, "forward",
                                                                "--config.model.weights=/nonexistent.pt")
    msg = in_process(capsys, "forward", "--config.mesh.num_devices=99")
    assert msg == f"error: mesh.num_devices=99 but only {__import__('jax').device_count()} devices are visible"


def test_infer_bad_input(capsys, tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"")
    base = ["--config", TINY, "-o", tmp_path / "out", "--checkpoint_path", ckpt]
    assert "/nonexistent.json: no such spec file" in in_process(capsys, "infer", *base, "--spec", "/nonexistent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert str(bad) in in_process(capsys, "infer", *base, "--spec", bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**json.load(open(EXAMPLE_SPEC)), "guidanse": 3}))
    msg = in_process(capsys, "infer", *base, "--spec", wrong)
    assert str(wrong) in msg and "guidanse" in msg
    msg = in_process(capsys, "infer", "--spec", EXAMPLE_SPEC, "-o", tmp_path / "out", "--checkpoint_path", "/nope")
    assert msg == "error: --checkpoint_path=/nope: no such file or directory"
    assert "--guidance=x" in in_process(capsys, "infer", *base, "--spec", EXAMPLE_SPEC, "--guidance=x")
    assert "no output directory" in in_process(capsys, "infer", "--spec", EXAMPLE_SPEC, "--checkpoint_path", ckpt)
    assert not (tmp_path / "out").exists()


def test_infer_command_line():
    msg = command("-m", "cosmos_jax.infer", "--spec", "/nonexistent.json", "-o", "/tmp/unused",
                  "--checkpoint_path", REPO, "--config", TINY)
    assert msg == "error: /nonexistent.json: no such spec file"


# ------------------------------------------------------------------------------------------------ tools

def test_export_bad_input(capsys, tmp_path):
    assert in_process(capsys, "export", tmp_path / "nope", tmp_path / "out") == \
        f"error: {tmp_path / 'nope'}: no such file or directory"
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'}: not a checkpoint" in in_process(capsys, "export", tmp_path / "empty",
                                                                   tmp_path / "out")
    assert "argument --step: invalid int value: 'x'" in in_process(capsys, "export", "a", "b", "--step", "x")
    assert "required: SRC, OUT_DIR" in in_process(capsys, "export")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_command_line(tmp_path):
    assert command("tools/export.py", tmp_path / "nope", tmp_path / "out") == \
        f"error: {tmp_path / 'nope'}: no such file or directory"


def test_validate_dataset_bad_input(capsys, tmp_path):
    assert in_process(capsys, "validate_dataset", "/nonexistent/ds") == \
        "error: /nonexistent/ds: no such dataset directory"
    assert "--cameras=foo: cameras ['foo'] are not in the base rig" in in_process(
        capsys, "validate_dataset", DATASET, "--cameras", "foo")
    (tmp_path / "empty").mkdir()
    assert validate_dataset.main([str(tmp_path / "empty")]) == 1  # a finding, not a crash: no "-1 usable"
    out = capsys.readouterr().out
    assert "captions/ftheta_camera_front_wide_120fov: missing" in out and "0 samples, 0 usable, 0 unusable" in out
    with pytest.raises(cli.UsageError):
        cli.run(validate_dataset.main, ["/nonexistent/ds", "--debug"])


def test_validate_dataset_command_line():
    assert command("tools/validate_dataset.py", "/nonexistent/ds") == "error: /nonexistent/ds: no such dataset directory"
    proc = subprocess.run([sys.executable, "tools/validate_dataset.py", "/nonexistent/ds", "--debug"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "UsageError" in proc.stderr


def test_precompute_bad_input(capsys, tmp_path):
    cache = tmp_path / "cache"
    tiny = ["--cache", cache, "--tiny", "--height", "32", "--width", "48", "--frames", "5"]
    assert in_process(capsys, "precompute", "--dataset", "/nonexistent/ds", *tiny) == \
        "error: /nonexistent/ds: no such dataset directory"
    broken = tmp_path / "ds"
    shutil.copytree(DATASET, broken)
    os.remove(broken / "videos" / "ftheta_camera_rear_tele_30fov" / "synthetic_0001.mp4")
    msg = in_process(capsys, "precompute", "--dataset", broken, *tiny)
    assert msg == f"error: {broken}/videos/ftheta_camera_rear_tele_30fov/synthetic_0001.mp4: missing"
    assert "--vae-weights" in in_process(capsys, "precompute", "--dataset", DATASET, "--cache", cache)
    msg = in_process(capsys, "precompute", "--dataset", DATASET, "--cache", cache, "--vae-weights", "/nope.pth")
    assert msg == "error: --vae-weights=/nope.pth: no such file"
    assert "--height=30: must be a positive multiple of 8" in in_process(
        capsys, "precompute", "--dataset", DATASET, *tiny, "--height", "30")
    assert "--frames=6: the VAE needs 4k+1 frames" in in_process(
        capsys, "precompute", "--dataset", DATASET, *tiny, "--frames", "6")
    assert not cache.exists()  # nothing was created by a failed start


def test_precompute_command_line(tmp_path):
    assert command("tools/precompute.py", "--dataset", "/nonexistent/ds", "--cache", tmp_path / "c", "--tiny") == \
        "error: /nonexistent/ds: no such dataset directory"


def test_parity_bad_input(capsys, tmp_path):
    out = tmp_path / "out.npz"
    assert in_process(capsys, "parity", "dit", "--case", "/nonexistent", "--out", out) == \
        "error: --case=/nonexistent: no such case directory"
    case = tmp_path / "case"
    case.mkdir()
    (case / "case.json").write_text("{bad")
    msg = in_process(capsys, "parity", "dit", "--case", case, "--out", out)
    assert msg.startswith(f"error: {case / 'case.json'}: not a valid JSON case description")
    (case / "case.json").write_text("{}")
    (case / "weights.safetensors").write_bytes(b"")
    (case / "inputs.npz").write_text("junk")
    assert in_process(capsys, "parity", "loss", "--case", case, "--out", out) == \
        f"error: {case / 'inputs.npz'}: not an .npz archive (a zip of .npy arrays)"
    np.savez(case / "inputs.npz", a=np.zeros(2))
    assert in_process(capsys, "parity", "dit", "--case", case, "--out", out) == \
        f"error: {case / 'case.json'}: no 'constructor_kwargs_tiny' field (top level or under 'network')"
    assert "invalid choice: 'bogus'" in in_process(capsys, "parity", "bogus")
    assert "--out=/nonexistent/o.npz: the folder /nonexistent does not exist" in in_process(
        capsys, "parity", "vae", "--case", case, "--out", "/nonexistent/o.npz")
    assert not out.exists()
    with pytest.raises(KeyError, match="constructor_kwargs_tiny"):
        cli.run(parity.main, ["dit", "--case", str(case), "--out", str(out), "--debug"])


def test_parity_command_line():
    assert command("tools/parity.py", "dit", "--case", "/nonexistent", "--out", "/tmp/o.npz") == \
        "error: --case=/nonexistent: no such case directory"


def test_vae_roundtrip_bad_input(capsys, tmp_path):
    out = tmp_path / "r.mp4"
    assert in_process(capsys, "vae_roundtrip", "--video", "/nonexistent.mp4", "--tiny", "--out", out) == \
        "error: /nonexistent.mp4: no such video file"
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"junk")
    assert in_process(capsys, "vae_roundtrip", "--video", junk, "--tiny", "--out", out).startswith(
        f"error: {junk}: cannot open as a video")
    assert "--size=10x10: expected HxW" in in_process(capsys, "vae_roundtrip", "--video", VIDEO, "--tiny", "--out",
                                                      out, "--size", "10x10")
    assert "give --weights" in in_process(capsys, "vae_roundtrip", "--video", VIDEO, "--out", out)
    assert not out.exists()


def test_vae_roundtrip_command_line(tmp_path):
    assert command("tools/vae_roundtrip.py", "--video", "/nonexistent.mp4", "--tiny", "--out", tmp_path / "r.mp4") \
        == "error: /nonexistent.mp4: no such video file"


# ------------------------------------------------------------------------------------------------ the shared helper

def _our_bug():
    table = {}
    return table["missing"]  # a plain bug in project code: no `raise` of ours


def test_internal_bugs_keep_their_traceback(capsys):
    with pytest.raises(KeyError):
        cli.run(lambda argv: _our_bug(), [])
    with pytest.raises(ValueError):  # raised inside numpy, not by one of our checks
        cli.run(lambda argv: np.zeros(3).reshape(2, 2), [])
    assert capsys.readouterr().err == ""

    from cosmos_jax.data import layout

    # a builtin ValueError raised by one of our checks (layout.SampleSpec) is bad input
    assert cli.run(lambda argv: layout.SampleSpec(cameras=tuple(argv)), ["front"]) == 2
    assert capsys.readouterr().err.startswith("error: cameras ['front'] are not in the base rig")
    assert cli.one_line("a.json: bad fields:\n  x: 1\n  y: 2") == "a.json: bad fields: x: 1; y: 2"
    assert cli.run(lambda argv: open("/nonexistent/file"), []) == 2
    assert capsys.readouterr().err == "error: /nonexistent/file: No such file or directory\n"


def test_atomic_savez_never_damages_the_previous_file(tmp_path, monkeypatch):
    path = cli.atomic_savez(str(tmp_path / "out"), a=np.arange(3))
    assert path == str(tmp_path / "out.npz")
    before = (tmp_path / "out.npz").read_bytes()

    def failing(f, **arrays):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing)
    with pytest.raises(OSError):
        cli.atomic_savez(path, a=np.arange(4))
    assert (tmp_path / "out.npz").read_bytes() == before and os.listdir(tmp_path) == ["out.npz"]


def test_compilation_cache_folder_follows_the_config_and_the_environment(monkeypatch, tmp_path):
    import jax

    from configs import transfer2_auto_multiview as cfg_file

    set_to = []
    monkeypatch.setattr(jax.config, "update", lambda k, v: set_to.append((k, v)))
    config = cfg_file.get_config("tiny")
    config.job.output_root = str(tmp_path)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    assert cli.enable_compilation_cache(config) == "/elsewhere" and set_to == []  # the environment wins
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert config.job.compilation_cache_dir == "auto"
    assert cli.enable_compilation_cache(config) == str(tmp_path / "xla_cache")
    config.job.compilation_cache_dir = "/fast/cache"
    assert cli.enable_compilation_cache(config) == "/fast/cache"
    config.job.compilation_cache_dir = ""
    assert cli.enable_compilation_cache(config) is None
    assert set_to == [("jax_compilation_cache_dir", str(tmp_path / "xla_cache")),
                      ("jax_compilation_cache_dir", "/fast/cache")]
