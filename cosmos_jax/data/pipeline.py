"""Grain input pipeline over the multiview dataset: deterministic shuffle, per-process shards, workers, prefetch,
and an iterator whose state is saved in / restored from the training checkpoint.

The reference walks one fixed permutation (DistributedSampler(shuffle=True, seed=0), never `set_epoch`); here every
epoch is reshuffled from the seed (Grain's `repeat` after `shuffle`), deterministically. There is one global sample
order: the global batch of step i is positions [i*B, (i+1)*B) of it (B = per-process batch x process count), and
process p loads rows [p*b, (p+1)*b) of that batch. So every step sees the same samples in the same rows whatever
the number of processes (2 processes x 4 devices train exactly like 1 process x 8 devices), and each process
decodes only its own rows.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from cosmos_jax.data import layout


class MultiviewSource:
    """Grain random-access source: index -> `layout.load_sample` dict."""

    def __init__(self, samples: Sequence[layout.SampleFiles], spec: layout.SampleSpec, threads: int = 0):
        self.samples, self.spec, self.threads = list(samples), spec, threads

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return layout.load_sample(self.samples[i], self.spec, threads=self.threads)

    def __repr__(self) -> str:  # Grain logs the source
        return f"MultiviewSource({len(self.samples)} samples, {len(self.spec.cameras)} views)"


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 1            # per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    num_workers: int = 0           # 0: decode in reader threads of this process
    read_threads: int = 4
    prefetch: int = 2              # batches buffered per worker / reader
    # Memory: a decoded 7-view 720p sample (video + control, uint8) is ~1.05 GiB, and each worker holds about
    # max(prefetch, read_threads) + 1 of them; with many workers keep read_threads=1 and prefetch small.


class _Rows:
    """Global batch of sample indices -> this process's rows (a class, not a lambda: Grain workers pickle it)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, indices):
        return indices[self.start:self.stop]


class _Load:
    """Sample indices -> one batch: the samples stacked leaf by leaf."""

    def __init__(self, source):
        self.source = source

    def __call__(self, indices):
        samples = [self.source[int(i)] for i in indices]
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def make_dataset(source, cfg: LoaderConfig, *, process_index: int = 0, process_count: int = 1):
    """A Grain IterDataset of this process's batches (dicts of stacked numpy arrays): rows
    [process_index * b, (process_index + 1) * b) of each global batch of b * process_count samples."""
    import grain

    b = cfg.batch_size
    global_batch = b * process_count
    if len(source) < global_batch:
        raise layout.DatasetError(f"{len(source)} samples are fewer than the global batch of {global_batch} "
                                  f"({b} per process x {process_count})")
    ds = grain.MapDataset.range(len(source))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.batch(global_batch, drop_remainder=True)
    ds = ds.map(_Rows(process_index * b, (process_index + 1) * b)).map(_Load(source))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=max(cfg.prefetch, cfg.read_threads)))
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; entry points without absl.app have none
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.prefetch))
    return it


def checkpoint_save_args(it):
    """Orbax args that store this process's iterator position inside a training checkpoint: put it in the
    `ocp.args.Composite` next to the train state (Grain writes one file per process)."""
    import grain

    return grain.checkpoint.CheckpointSave(it)


def checkpoint_restore_args(it):
    """Orbax args that move a freshly built iterator (same source and `LoaderConfig`) to the saved position."""
    import grain

    return grain.checkpoint.CheckpointRestore(it)


def iterator_state(it) -> bytes:
    """The iterator position as bytes (stored next to the train state in the checkpoint)."""
    return json.dumps(it.get_state()).encode()


def restore_iterator(it, state: bytes) -> None:
    it.set_state(json.loads(state.decode()))


def make_source(dataset_root: str, spec: layout.SampleSpec, *, cache=None, skip_bad: bool = False):
    """The training source: cached latents + contexts when a `cache.Cache` is given, raw videos otherwise."""
    samples = layout.index_dataset(dataset_root, spec, skip_bad=skip_bad, probe=cache is None)
    if cache is not None:
        from cosmos_jax.data.cache import CachedSource

        return CachedSource(cache, [s.name for s in samples])
    return MultiviewSource(samples, spec)
