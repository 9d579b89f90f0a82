"""The post-training job end to end on the tiny config: loss falls, frozen weights stay, checkpoints and exact
resume, other meshes and process counts, bad input."""

import json
import os
import socket
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from configs import transfer2_auto_multiview as cfg_file
from cosmos_jax import build
from cosmos_jax.training import metrics as metrics_lib
from cosmos_jax.training import trainer

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_worker.py")


def tiny(tmp_path, name, **overrides):
    config = cfg_file.get_config("tiny")
    config.job.output_root = str(tmp_path)
    config.job.name = name
    config.trainer.logging_iter = 1
    for key, value in overrides.items():
        node = config
        *path, last = key.split("__")
        for p in path:
            node = node[p]
        node[last] = value
    return config


def losses(job_dir):
    return {r["step"] - 1: r["loss"] for r in metrics_lib.read_metrics(job_dir)}


@pytest.fixture(scope="module")
def run50(tmp_path_factory):
    """The tiny job as the README runs it (50 steps, checkpoints at 25 and 50), every step's loss logged."""
    root = tmp_path_factory.mktemp("run50")
    config = tiny(root, "run50", trainer__max_iter=50, trainer__save_iter=25)
    summary = trainer.train(config)
    return config, summary


def test_tiny_job_loss_falls(run50):
    _, summary = run50
    loss = np.array([summary["losses"][s] for s in range(50)])
    assert np.isfinite(loss).all()
    first, last = loss[:15].mean(), loss[-15:].mean()
    assert last < 0.75 * first, f"loss did not fall: first 15 steps {first:.3f}, last 15 {last:.3f}"


def test_job_dir_holds_checkpoints_metrics_tensorboard_and_config(run50):
    config, summary = run50
    jd = summary["job_dir"]
    assert jd == os.path.join(config.job.output_root, "cosmos_transfer_v2p5", "auto_multiview", "run50")
    ckpts = os.path.join(jd, "checkpoints")
    assert sorted(d for d in os.listdir(ckpts) if d.startswith("iter_")) == ["iter_000000025", "iter_000000050"]
    assert open(os.path.join(ckpts, "latest_checkpoint.txt")).read() == "iter_000000050\n"
    assert os.path.isdir(os.path.join(ckpts, "iter_000000050", "model"))
    records = metrics_lib.read_metrics(jd)
    assert [r["step"] for r in records] == list(range(1, 51))
    assert {"step", "loss", "lr", "grad_norm", "step_time_s"} <= set(records[0])
    # lr follows the schedule: f(0) = f_start on the first update, then the linear warm-up
    assert records[0]["lr"] == pytest.approx(config.optimizer.lr * config.scheduler.f_start)
    assert records[10]["lr"] == pytest.approx(config.optimizer.lr * config.scheduler.f_max)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(jd, "tensorboard")))
    saved = json.load(open(os.path.join(jd, "config.json")))
    assert saved["model"]["model_channels"] == 64 and saved["trainer"]["max_iter"] == 50


def test_frozen_weights_are_bit_identical_and_the_control_branch_moved(run50):
    config, summary = run50
    cfg = build.dit_config_from(config.model)
    mesh = build.mesh_from(config.mesh)
    with jax.set_mesh(mesh):
        initial = jax.tree.map(np.asarray, build.init_params(cfg, mesh, seed=config.seed))
    trainable0, frozen0 = build.split_params(initial, cfg)
    model = jax.tree.map(np.asarray, summary["state"]["model"])
    assert set(model["frozen"]) == set(frozen0) and "blocks" in frozen0 and "control_blocks" in model["trainable"]
    for a, b in zip(jax.tree.leaves(model["frozen"]), jax.tree.leaves(frozen0)):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model["trainable"]),
                                                      jax.tree.leaves(trainable0))]
    assert all(moved)
    # the job's checkpoint is valid initial weights for another run (--config.model.weights=<checkpoints dir>):
    # its regular weights, the fp32 masters of the control branch and the frozen base
    with jax.set_mesh(mesh):
        loaded = jax.tree.map(np.asarray, build.init_params(cfg, mesh, weights=os.path.join(summary["job_dir"],
                                                                                             "checkpoints")))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(build.merge_params(model["trainable"],
                                                                                 model["frozen"]))):
        np.testing.assert_array_equal(a, b)
    # the EMA is a separate, different copy of the trainable weights
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model["ema"]),
                                                        jax.tree.leaves(model["trainable"])))


def test_killed_run_resumes_bit_identically(run50, tmp_path):
    _, full = run50
    config = tiny(tmp_path, "resume", trainer__max_iter=6, trainer__save_iter=3)
    first = trainer.train(config, stop_after=4)  # dies after step 4, with iter_3 its last checkpoint
    assert first["end_step"] == 4
    second = trainer.train(config)
    assert second["start_step"] == 3 and second["end_step"] == 6
    # the reference bookkeeping resumes with the state: samples of steps 1-3 (saved) + 4-6
    assert second["stats"]["net"]["accum_video_sample_counter"] == 6 * config.data.batch_size
    for step in range(6):
        got = second["losses"].get(step, first["losses"].get(step))
        assert got == full["losses"][step], f"step {step}: {got!r} vs uninterrupted {full['losses'][step]!r}"
    # a damaged latest checkpoint is skipped with a warning and the run resumes from the one before it
    ckpts = os.path.join(summary_dir(second), "checkpoints")
    item = os.path.join(ckpts, "iter_000000006", "model")
    for root, _, files in os.walk(item):
        for f in files:
            os.remove(os.path.join(root, f))
    config.trainer.max_iter = 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third = trainer.train(config)
    assert third["start_step"] == 3
    assert any("iter_000000006" in str(w.message) for w in caught)
    for step in range(3, 6):
        assert third["losses"][step] == full["losses"][step]


def summary_dir(summary):
    return summary["job_dir"]


def test_checkpoint_moves_between_one_and_eight_devices(tmp_path):
    """1 device -> 8 devices (data 2 x context 4; the frames don't divide 4, so tokens are split) -> 1 device."""
    one = dict(data__batch_size=2, mesh__num_devices=1, trainer__max_iter=6, trainer__save_iter=2)
    eight = dict(data__batch_size=2, mesh__num_devices=0, mesh__data=2, mesh__context=4, trainer__save_iter=2)
    straight = trainer.train(tiny(tmp_path, "straight", **one))
    trainer.train(tiny(tmp_path, "moved", **{**one, "trainer__max_iter": 2}))
    trainer.train(tiny(tmp_path, "moved", **{**eight, "trainer__max_iter": 4}))
    back = trainer.train(tiny(tmp_path, "moved", **one))
    assert back["start_step"] == 4
    got = losses(back["job_dir"])
    assert sorted(got) == list(range(6))
    for step in range(6):
        assert got[step] == pytest.approx(straight["losses"][step], rel=2e-4, abs=1e-6), step


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_train_like_one_process_of_eight(tmp_path):
    over = {"data.batch_size": 2, "mesh.num_devices": 0, "mesh.data": 2, "mesh.context": 4,
            "trainer.max_iter": 3, "trainer.save_iter": 3, "trainer.logging_iter": 1,
            "job.output_root": str(tmp_path)}
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, WORKER, "4", json.dumps({**over, "job.name": "multi"})],
                              env={**env, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                                   "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    single = subprocess.run([sys.executable, WORKER, "8", json.dumps({**over, "job.name": "single"})], env=env,
                            capture_output=True, text=True, timeout=600)
    outs = [p.communicate(timeout=600) for p in procs]
    for (out, err), p in zip(outs, procs):
        assert p.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]

    def parse(out):
        return json.loads([line for line in out.splitlines() if line.startswith("LOSSES ")][-1][7:])

    ref = parse(single.stdout)
    for out, _ in outs:  # every process sees the same global losses
        got = parse(out)
        assert sorted(got) == sorted(ref) == ["0", "1", "2"]
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-5), k
    assert os.path.isdir(os.path.join(tmp_path, "cosmos_transfer_v2p5", "auto_multiview", "multi", "checkpoints",
                                      "iter_000000003", "model"))


def test_nonfinite_losses_stop_training_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    config = tiny(tmp_path, "nan", trainer__max_iter=8, trainer__save_iter=2, trainer__max_nonfinite_steps=2)
    real = trainer.to_step_batch
    calls = {"n": 0}

    def poisoned(entries):
        batch = real(entries)
        calls["n"] += 1
        if calls["n"] > 3:  # from the 4th step on the latents are NaN
            batch["x0"][:] = np.nan
        return batch

    monkeypatch.setattr(trainer, "to_step_batch", poisoned)
    with pytest.raises(trainer.TrainingError, match=r"2 consecutive non-finite losses \(steps 4\.\.5\)"):
        trainer.train(config)
    ckpts = os.path.join(trainer.job_dir(config), "checkpoints")
    assert open(os.path.join(ckpts, "latest_checkpoint.txt")).read() in ("iter_000000002\n", "iter_000000004\n")


@pytest.mark.parametrize("overrides,pattern", [
    (dict(data__num_frames=9), r"data\.num_frames=9"),
    (dict(data__height=60), r"data\.height=60"),
    (dict(data__dataset_dir="/nonexistent/ds"), r"data\.dataset_dir=/nonexistent/ds"),
    (dict(model__weights="/nonexistent/w.pt"), r"model\.weights=/nonexistent/w\.pt"),
    (dict(data__cache_dir="/nonexistent/cache"), r"data\.cache_dir=/nonexistent/cache"),
    (dict(loss__conditional_frames_probs=(0.5, 0.25, 0.25)), r"conditional_frames_probs=.*model\.state_t=2"),
])
def test_bad_config_names_the_field(tmp_path, overrides, pattern):
    with pytest.raises(trainer.ConfigError, match=pattern):
        trainer.train(tiny(tmp_path, "bad", **overrides))


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    env = {**os.environ, "COSMOS_JAX_OUTPUT_ROOT": str(tmp_path)}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bad_data = subprocess.run([sys.executable, "-m", "cosmos_jax.train", "--config.data.dataset_dir=/nonexistent"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert bad_data.returncode != 0
    assert bad_data.stderr.strip().splitlines()[-1] == ("error: data.dataset_dir=/nonexistent: no such directory")
    typo = subprocess.run([sys.executable, "-m", "cosmos_jax.train", "--config.modle.dtype=float32"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert typo.returncode != 0 and "modle" in typo.stderr and "Traceback" not in typo.stderr


def test_periodic_samples_of_the_regular_and_ema_weights(tmp_path):
    from cosmos_jax.data import video

    config = tiny(tmp_path, "samples", trainer__max_iter=2, trainer__save_iter=2, trainer__sample_iter=2,
                  trainer__sample_steps=2)
    summary = trainer.train(config)
    folder = os.path.join(summary["job_dir"], "samples")
    assert sorted(os.listdir(folder)) == ["sample_ema_iter_000000002.mp4", "sample_reg_iter_000000002.mp4"]
    for name in os.listdir(folder):
        info = video.probe(os.path.join(folder, name))
        # the 3x3 grid of the 7 views at the training resolution, the chunk's 5 frames
        assert (info.height, info.width, info.num_frames) == (3 * config.data.height, 3 * config.data.width, 5)
