"""The reference's training bookkeeping (`WeightTrainingStat`, predict2/networks/model_weights_stats.py): four scalar
buffers of each network, `accum_video_sample_counter`, `accum_image_sample_counter`, `accum_iteration` (int64) and
`accum_train_in_hours` (float32), which its checkpoints and exports carry next to the weights.

What the reference's post-training does with them: the buffers come in with the weights it starts from (its base
checkpoint), and each training step adds the global batch (per-GPU batch x data-parallel size) to the trained
network's `accum_video_sample_counter` (`_update_train_stats`, text2world_model_rectified_flow.py L431-438, called
first thing in `training_step_multiview`, multiview_vid2vid_model_rectified_flow.py L606); nothing else touches
them, and the EMA network, whose update reads parameters only (`FastEmaModelUpdater`), keeps the values it started
with. So do we: a plain dict {"net": {key: value}, "net_ema": {key: value}} of host integers / floats, saved with
every checkpoint as the JSON item `stats/` and written into the exports' `accum_*` keys.
"""

from __future__ import annotations

from typing import Mapping

from cosmos_jax.weights.keymap import ACCUM_KEYS  # the reference's buffer names

NETWORKS = ("net", "net_ema")


class StatsError(ValueError):
    """Malformed bookkeeping (the message names its source and field)."""


def _value(key: str, v, where: str):
    try:
        return float(v) if key == "accum_train_in_hours" else int(v)
    except (TypeError, ValueError):
        raise StatsError(f"{where}: {key} = {v!r} is not a number") from None


def initial(extras: Mapping | None = None, where: str = "weights") -> dict:
    """The bookkeeping of a run starting from weights whose `accum_*` scalars are `extras` (missing ones 0; None:
    random weights): both networks start with them, as the reference's net and net_ema load the same buffers."""
    extras = dict(extras or {})
    net = {k: _value(k, extras.get(k, 0), where) for k in ACCUM_KEYS}
    return {"net": net, "net_ema": dict(net)}


def after_steps(stats: Mapping, steps: int, global_batch: int) -> dict:
    """`stats` after `steps` training steps of `global_batch` video samples each (the trained network's video
    counter only, as the reference)."""
    out = {n: dict(stats[n]) for n in NETWORKS}
    out["net"]["accum_video_sample_counter"] += int(steps) * int(global_batch)
    return out


def validate(stats, where: str) -> dict:
    """`stats` as read from a checkpoint, checked: {"net": {...}, "net_ema": {...}} with every ACCUM_KEYS field."""
    if not isinstance(stats, Mapping):
        raise StatsError(f"{where}: expected an object with {NETWORKS}, got {type(stats).__name__}")
    out = {}
    for n in NETWORKS:
        if not isinstance(stats.get(n), Mapping):
            raise StatsError(f"{where}: field '{n}' missing or not an object")
        missing = [k for k in ACCUM_KEYS if k not in stats[n]]
        if missing:
            raise StatsError(f"{where}: field '{n}' lacks {missing}")
        out[n] = {k: _value(k, stats[n][k], f"{where} {n}") for k in ACCUM_KEYS}
    return out
