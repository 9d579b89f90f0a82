"""The reference's accum_* bookkeeping (training/train_stats.py): continued from the starting weights, the trained
network's video counter advanced by the global batch per step, the EMA's left as it started, saved with every
checkpoint and written into the exports - from a DCP checkpoint of the reference trainer whose buffers are 80 / 10 /
0.125 (tests/fixtures/dit_control/dcp)."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from configs import transfer2_auto_multiview as cfg_file
from cosmos_jax import build
from cosmos_jax.training import checkpoint as ckpt_lib
from cosmos_jax.training import train_stats, trainer
from cosmos_jax.weights import export, torch_io


def test_initial_and_after_steps_follow_the_reference():
    extras = {"accum_video_sample_counter": np.int64(80), "accum_iteration": np.asarray(10),
              "accum_train_in_hours": np.float32(0.125)}
    s = train_stats.initial(extras)
    assert s["net"] == s["net_ema"] == {"accum_video_sample_counter": 80, "accum_image_sample_counter": 0,
                                        "accum_iteration": 10, "accum_train_in_hours": 0.125}
    t = train_stats.after_steps(s, 3, 8)
    assert t["net"]["accum_video_sample_counter"] == 104  # 80 + 3 steps x 8 samples
    assert t["net_ema"] == s["net_ema"] and t["net"]["accum_iteration"] == 10  # the reference counts samples only
    assert s["net"]["accum_video_sample_counter"] == 80  # not modified in place
    assert train_stats.initial() == train_stats.after_steps(train_stats.initial(), 0, 8)


FULL = train_stats.initial()["net"]


@pytest.mark.parametrize("bad, field", [({"net": FULL}, "'net_ema' missing"),
                                        ({"net": {"accum_iteration": 1}, "net_ema": FULL}, "'net' lacks"),
                                        ({"net": FULL, "net_ema": {**FULL, "accum_iteration": "x"}}, "accum_iteration"),
                                        ("x", "expected an object")])
def test_malformed_stats_name_the_field(bad, field):
    with pytest.raises(train_stats.StatsError, match=field):
        train_stats.validate(bad, "ckpt/stats")


def test_a_run_continues_the_bookkeeping_of_its_weights_into_checkpoint_and_export(tmp_path, dit_parity, capsys):
    dcp = dit_parity / "dcp" / "checkpoints"
    config = cfg_file.get_config("tiny")
    config.job.output_root = str(tmp_path)
    config.job.name = "stats"
    config.model.weights = str(dcp)  # the tiny network is the fixture's; its net.* buffers: 80 / 0 / 10 / 0.125
    config.data.batch_size = 2
    config.trainer.max_iter = 3
    config.trainer.save_iter = 2
    summary = trainer.train(config)
    ckpts = pathlib.Path(summary["job_dir"]) / "checkpoints"
    saved = ckpt_lib.read_stats(ckpts / "iter_000000002")
    assert saved["net"]["accum_video_sample_counter"] == 80 + 2 * 2
    assert summary["stats"]["net"]["accum_video_sample_counter"] == 80 + 3 * 2
    assert json.loads(json.dumps(summary["stats"])) == ckpt_lib.read_stats(ckpts / "iter_000000003")

    out = tmp_path / "export"
    export.export(ckpts, out, progress=False)
    model = torch_io.load_state_dict(out / export.MODEL_PT)
    ema = torch_io.load_state_dict(out / export.EMA_FP32_PT)
    for prefix, sd, video in (("net.", model, 86), ("net_ema.", model, 80), ("net.", ema, 80)):
        assert int(np.asarray(sd[f"{prefix}accum_video_sample_counter"])) == video, prefix
        assert int(np.asarray(sd[f"{prefix}accum_iteration"])) == 10
        assert int(np.asarray(sd[f"{prefix}accum_image_sample_counter"])) == 0
        assert float(np.asarray(sd[f"{prefix}accum_train_in_hours"], np.float32)) == 0.125
    # a run started from this checkpoint's weights (model.weights=<checkpoints>) starts from its networks' counters
    cfg = build.dit_config_from(config.model)
    for ema, video in ((False, 86), (True, 80)):
        extras = build.load_network_params(ckpts, cfg, ema=ema)[1]["extras"]
        assert train_stats.initial(extras)["net"]["accum_video_sample_counter"] == video
    # a checkpoint without stats/ (written before the bookkeeping was kept: not in Orbax's item list either) exports
    # zeros and says so
    step3 = ckpts / "iter_000000003"
    shutil.rmtree(step3 / "stats")
    meta = json.loads((step3 / ckpt_lib.STEP_METADATA).read_text())
    del meta["item_handlers"]["stats"]
    (step3 / ckpt_lib.STEP_METADATA).write_text(json.dumps(meta))
    assert ckpt_lib.damage(step3) is None
    export.export(ckpts, tmp_path / "export_old", progress=False, ema=False)
    assert "has no stats/ item" in capsys.readouterr().err
    old = torch_io.load_state_dict(tmp_path / "export_old" / export.MODEL_PT)
    assert int(np.asarray(old["net.accum_video_sample_counter"])) == 0
    assert int(np.asarray(old["net.accum_iteration"])) == 0
    # and a run resumed from it counts as if from zero (its 3 steps of 2 samples, then one more), saying so
    config.trainer.max_iter = 4
    resumed = trainer.train(config)
    assert "has no stats/ item" in capsys.readouterr().out
    assert resumed["stats"]["net"]["accum_video_sample_counter"] == 4 * 2
