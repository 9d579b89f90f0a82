"""Run logs: one JSON object per logged step in `metrics.jsonl`, the same scalars in TensorBoard, a line on stdout.

TensorBoard event files are written with `tensorboardX` (a small pure-Python package) when it is installed;
without it only the JSONL file is written and a warning says so once. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import warnings


class MetricsLogger:
    def __init__(self, job_dir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(job_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(job_dir, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(job_dir, "tensorboard"))
        except ImportError:
            warnings.warn("tensorboardX is not installed: metrics go to metrics.jsonl only "
                          "(pip install tensorboardX for TensorBoard event files)", stacklevel=2)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for k, v in scalars.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN/inf
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", float(v), int(step))
            self._tb.flush()

    def write_image(self, step: int, tag: str, image_hwc) -> None:
        """A uint8 (H, W, 3) image in TensorBoard (e.g. a frame of a generated sample)."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc, int(step), dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(job_dir: str) -> list[dict]:
    """All records of a job's metrics.jsonl (tests, tools)."""
    path = os.path.join(job_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
