"""Training checkpoints: an Orbax CheckpointManager over `<job>/checkpoints/`, named and pointed to as the reference.

On disk (one directory per saved step, named as the reference's `iter_{iteration:09d}`, dcp.py L676-689):
```
<job>/checkpoints/
  iter_000000200/
    model/     Orbax pytree (OCDBT): {"trainable": fp32, "frozen": weight dtype, "ema": fp32 (absent when EMA is off)}
    optim/     Orbax pytree: the optax optimizer state
    trainer/   Orbax pytree: {"step", "rng" (key data, uint32), "nonfinite_steps"}
    data/      Grain iterator position, one JSON file per process (absent when no iterator was given)
    config/    the resolved run config as JSON
    stats/     the reference's accum_* bookkeeping of net and net_ema as JSON (training/train_stats.py; absent in
               checkpoints written before it was kept)
    _CHECKPOINT_METADATA, commit_success.txt    (Orbax: saved items; the commit marker)
  latest_checkpoint.txt   "iter_XXXXXXXXX\n", rewritten (atomically, by process 0) once a step has committed
```
A step counts only when complete: committed (`commit_success.txt`; Orbax writes into a `*.orbax-checkpoint-tmp`
directory and renames it when done, so an interrupted save never has the final name) and with the directories and
Orbax metadata of its items present. A damaged step is skipped with a warning; a restore of the latest step that
fails falls back to the previous complete one, with a warning. Steps found damaged are renamed aside
(`iter_XXXXXXXXX.damaged-<time>`) when the run saves that step again, never deleted.

The state is one pytree dict {"model", "optim", "trainer"} (training/step.py). Restores go straight into the target
shardings of an abstract state (jax.ShapeDtypeStruct leaves with `.sharding`), so the mesh may differ from the one
that saved. `read_model` gives the network weights as numpy without a mesh or config (for tools/export.py).
Paths are local (or network-mounted) file systems.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from cosmos_jax.training import train_stats

STEP_PREFIX = "iter"
STEP_DIGITS = 9
LATEST_FILE = "latest_checkpoint.txt"
COMMIT_MARKER = "commit_success.txt"   # Orbax's (atomicity_types.COMMIT_SUCCESS_FILE)
STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's per-step metadata: lists the saved items
STATE_ITEMS = ("model", "optim", "trainer")
ITEMS = (*STATE_ITEMS, "data", "config", "stats")
REQUIRED_ITEMS = ("model", "config")
_PYTREE_FILES = ("_METADATA",)          # every Orbax pytree item has it; plus manifest.ocdbt when OCDBT is used
_STEP_RE = re.compile(rf"{STEP_PREFIX}_(\d{{{STEP_DIGITS},}})")


class CheckpointError(ValueError):
    """Not a checkpoint directory, a missing step, an incomplete or damaged step (the message names the directory)."""


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}_{int(step):0{STEP_DIGITS}d}"


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


# ------------------------------------------------------------------------------------------------ completeness

def damage(step_dir: str | os.PathLike) -> str | None:
    """Why `step_dir` is not a complete checkpoint, or None when it is. Cheap: names, sizes and small JSON files.

    Complete = committed (Orbax's commit marker), Orbax's step metadata readable, and every item it lists
    (plus model and config) present with its metadata files. Damage inside array data (a truncated chunk) is only
    seen when reading; `Checkpointer.restore` falls back past it.
    """
    d = pathlib.Path(step_dir)
    if not d.is_dir():
        return "not a directory"
    if not (d / COMMIT_MARKER).is_file():
        return f"no commit marker ({COMMIT_MARKER}): the save did not finish"
    try:
        items = set(json.loads((d / STEP_METADATA).read_text())["item_handlers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"Orbax step metadata {STEP_METADATA} missing or unreadable ({type(e).__name__}: {e})"
    for item in sorted(items | set(REQUIRED_ITEMS)):
        sub = d / item
        if not sub.is_dir():
            return f"item directory {item}/ missing"
        if item in STATE_ITEMS:
            for f in _PYTREE_FILES:
                if not (sub / f).is_file() or (sub / f).stat().st_size == 0:
                    return f"{item}/{f} missing or empty"
            try:
                meta = json.loads((sub / "_METADATA").read_text())
            except (OSError, ValueError) as e:
                return f"{item}/_METADATA unreadable ({type(e).__name__}: {e})"
            if meta.get("use_ocdbt", True) and not (sub / "manifest.ocdbt").is_file():
                return f"{item}/manifest.ocdbt missing"
        elif not any(sub.iterdir()):
            return f"item directory {item}/ is empty"
    return None


def _step_dirs(directory: pathlib.Path) -> dict[int, pathlib.Path]:
    """All directories named like a step (complete or not); `*.orbax-checkpoint-tmp*` and renamed ones excluded."""
    if not directory.is_dir():
        return {}
    out = {}
    for p in directory.iterdir():
        m = _STEP_RE.fullmatch(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def complete_steps(directory: str | os.PathLike, *, warn: bool = True) -> list[int]:
    """Complete steps under a checkpoints directory, ascending; damaged ones are left out with a warning."""
    steps = []
    for step, path in sorted(_step_dirs(pathlib.Path(directory)).items()):
        why = damage(path)
        if why is None:
            steps.append(step)
        elif warn:
            warnings.warn(f"skipping checkpoint {path}: {why}", stacklevel=2)
    return steps


def _write_latest(directory: pathlib.Path, step: int) -> None:
    """`latest_checkpoint.txt` = "iter_XXXXXXXXX\\n", replaced atomically (the reference's
    `_write_latest_checkpoint_file`)."""
    tmp = directory / f".{LATEST_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(step_name(step) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / LATEST_FILE)


# ------------------------------------------------------------------------------------------------ PRNG keys
# Orbax stores arrays, not typed PRNG keys: a typed key leaf is stored as its key data (uint32) and wrapped again on
# restore with the impl of the abstract leaf. Raw uint32 keys (jax.random.key_data) need nothing.

def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_key_data(x):
    """(abstract key data leaf, a function wrapping restored key data back into `x`'s key type and sharding)."""
    impl = []
    data = jax.eval_shape(lambda k: (impl.append(jax.random.key_impl(k)), jax.random.key_data(k))[1], x)
    sharding = getattr(x, "sharding", None)
    wrap = jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl[0]), out_shardings=sharding)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding), wrap


def _identity(x):
    return x


def _split_keys(abstract):
    """Abstract tree with key leaves replaced by their key data, and a same-structure tree of functions that turn
    the restored leaves back (wrap key data; identity elsewhere)."""
    target = jax.tree.map(lambda x: _abstract_key_data(x)[0] if _is_key(x) else x, abstract)
    wraps = jax.tree.map(lambda x: _abstract_key_data(x)[1] if _is_key(x) else _identity, abstract)
    return target, wraps


def _wrap_keys(tree, wraps):
    return jax.tree.map(lambda w, x: w(x), wraps, tree)


def _jsonable(config) -> dict:
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (the resolved run config), got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError) as e:
        raise TypeError(f"config is not JSON-serialisable: {e}") from e


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every JAX process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


# ------------------------------------------------------------------------------------------------ manager

class Checkpointer:
    """Saves and restores the train state under `directory` (= `<job>/checkpoints`).

    ckpt = Checkpointer(job_dir / "checkpoints", max_to_keep=None)
    if (step := ckpt.latest_step()) is not None:
        state, config = ckpt.restore(None, abstract_state, data_iterator=it)   # latest, falling back past damage
    ...
    ckpt.save(step, state, data_iterator=it, config=config.to_dict())       # async: returns after the device copy
    ckpt.close()                                                             # waits; writes latest_checkpoint.txt
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None, async_save: bool = True):
        ocp = _ocp()
        self.directory = pathlib.Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory")
        self.async_save = async_save
        self._pending: int | None = None     # saved, maybe not yet committed
        self._failed: set[int] = set()       # steps whose restore failed in this run
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep or None,
            step_name_format=ocp.step.standard_name_format(step_prefix=STEP_PREFIX,
                                                           step_format_fixed_length=STEP_DIGITS),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,     # an interrupted save's *.orbax-checkpoint-tmp directory is garbage
            create=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # -- queries

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / step_name(step)

    def all_steps(self) -> list[int]:
        """Complete steps, ascending (damaged ones skipped with a warning)."""
        return complete_steps(self.directory)

    def latest_step(self) -> int | None:
        """The latest complete step (never an interrupted or damaged save), or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save

    def save(self, step: int, state: Mapping[str, Any], *, data_iterator=None, config: Mapping,
             stats: Mapping | None = None, force: bool = False) -> None:
        """Save `state` ({"model", "optim", "trainer"}; "model" required) at `step`, with the run's `config` and
        the reference bookkeeping `stats` (train_stats) when given.

        Async saves return once the arrays are copied off the devices; the files are written in the background and
        `latest_checkpoint.txt` is updated once they have committed (at the next save, `wait()` or `close()`).
        """
        ocp = _ocp()
        from cosmos_jax.data import pipeline

        step = int(step)
        unknown = set(state) - set(STATE_ITEMS)
        if unknown or "model" not in state:
            raise CheckpointError(f"state for {self.directory} must hold 'model' and may hold {STATE_ITEMS}; "
                                  f"got {sorted(state)}")
        config = _jsonable(config)
        self._publish()  # the previous save has committed before this one starts (Orbax would wait here anyway)
        self._clear_for(step)
        args = {k: ocp.args.StandardSave(_keys_to_data(v)) for k, v in state.items()}
        if data_iterator is not None:
            args["data"] = pipeline.checkpoint_save_args(data_iterator)
        args["config"] = ocp.args.JsonSave(config)
        if stats is not None:
            args["stats"] = ocp.args.JsonSave(train_stats.validate(stats, f"stats of step {step}"))
        if not self._mgr.save(step, args=ocp.args.Composite(**args), force=force):
            raise CheckpointError(f"Orbax declined to save step {step} in {self.directory} "
                                  f"(latest Orbax step: {self._mgr.latest_step()})")
        self._pending = step
        if not self.async_save:
            self._publish()

    def _clear_for(self, step: int) -> None:
        """Orbax refuses (or silently skips) a save at or below an existing step. Steps there that are damaged or
        failed to restore in this run are renamed aside; a complete one is an error (a second run in one job dir?)."""
        blocking = [s for s in self._mgr.all_steps() if s >= step]
        if not blocking:
            return
        good = [s for s in blocking if s not in self._failed and damage(self.step_dir(s)) is None]
        if good:
            raise CheckpointError(f"{self.directory} already holds complete checkpoint(s) at step(s) {good} >= {step}; "
                                  f"resume from the latest step or use another job directory")
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for s in blocking:
                src = self.step_dir(s)
                if src.exists():
                    dst = src.with_name(f"{src.name}.damaged-{stamp}")
                    warnings.warn(f"renaming damaged checkpoint {src} to {dst.name} before saving step {step}",
                                  stacklevel=3)
                    os.replace(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"cosmos_jax checkpoint clear {step}")
        self._mgr.reload()

    def _publish(self) -> None:
        """Wait for the pending save to commit, then point `latest_checkpoint.txt` at it."""
        if self._pending is None:
            return
        self._mgr.wait_until_finished()  # raises if the background write failed; the pointer then stays as it was
        step, self._pending = self._pending, None
        if jax.process_index() == 0 and damage(self.step_dir(step)) is None:
            _write_latest(self.directory, step)

    def wait(self) -> None:
        """Block until the last save has committed (and `latest_checkpoint.txt` names it)."""
        self._publish()
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restore

    def restore(self, step: int | None, abstract_state: Mapping[str, Any], *, data_iterator=None
                ) -> tuple[dict, dict]:
        """(state, config) of `step` (None: the latest complete step, falling back to earlier complete steps with a
        warning when a restore fails), arrays placed as the leaves of `abstract_state` say (ShapeDtypeStruct with
        `.sharding`, or arrays). Only the items present in `abstract_state` are read. `data_iterator` (a fresh one,
        same source and loader config) is moved to the saved position in place."""
        self.wait()
        unknown = set(abstract_state) - set(STATE_ITEMS)
        if unknown:
            raise CheckpointError(f"abstract_state for {self.directory} may hold {STATE_ITEMS}; got {sorted(unknown)}")
        if step is not None:
            step = int(step)
            path = self.step_dir(step)
            if not path.is_dir():
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                      f"(complete steps: {complete_steps(self.directory, warn=False)})")
            why = damage(path)
            if why is not None:
                raise CheckpointError(f"checkpoint {path} is incomplete: {why}")
            return self._restore_step(step, abstract_state, data_iterator)
        candidates = complete_steps(self.directory)[::-1]
        if not candidates:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        errors = []
        for s in candidates:
            try:
                result, error = self._restore_step(s, abstract_state, data_iterator), None
            except Exception as e:  # noqa: BLE001 — damaged data shows up as any reader error
                result, error = None, e
            if _everywhere(error is None):  # every process resumes from the same step
                return result
            self._failed.add(s)
            why = f"{type(error).__name__}: {error}" if error is not None else "failed on another process"
            errors.append(f"{self.step_dir(s)}: {why}")
            warnings.warn(f"restoring checkpoint {self.step_dir(s)} failed ({why}); trying the previous complete step",
                          stacklevel=2)
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored:\n" + "\n".join(errors))

    def _restore_step(self, step: int, abstract_state, data_iterator) -> tuple[dict, dict]:
        ocp = _ocp()
        from cosmos_jax.data import pipeline

        path = self.step_dir(step)
        args, wraps = {}, {}
        for k, v in abstract_state.items():
            if not (path / k).is_dir():
                raise CheckpointError(f"checkpoint {path} has no '{k}' item")
            target, wraps[k] = _split_keys(v)
            args[k] = ocp.args.StandardRestore(target)
        if data_iterator is not None:
            if (path / "data").is_dir():
                args["data"] = pipeline.checkpoint_restore_args(data_iterator)
            else:
                warnings.warn(f"checkpoint {path} holds no data iterator position: the iterator starts afresh",
                              stacklevel=3)
        args["config"] = ocp.args.JsonRestore()
        out = self._mgr.restore(step, args=ocp.args.Composite(**args))
        state = {k: _wrap_keys(out[k], wraps[k]) for k in abstract_state}
        return state, dict(out["config"])


# ------------------------------------------------------------------------------------------------ export

def resolve_step_dir(path: str | os.PathLike, step: int | None) -> pathlib.Path:
    """The step directory `read_model` reads for (path, step)."""
    return _resolve_step_dir(path, step)[0]


def _resolve_step_dir(path: str | os.PathLike, step: int | None) -> tuple[pathlib.Path, int]:
    p = pathlib.Path(path).absolute()
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a checkpoint directory (does not exist or is not a directory)")
    m = _STEP_RE.fullmatch(p.name)
    if (m is not None and (p / "model").is_dir()) or (p / STEP_METADATA).is_file():
        if m is None:
            raise CheckpointError(f"{p} looks like an Orbax step but is not named {STEP_PREFIX}_<{STEP_DIGITS} digits>")
        found = int(m.group(1))
        if step is not None and int(step) != found:
            raise CheckpointError(f"{p} holds step {found}, not {step}")
        return p, found
    if not _step_dirs(p) and (p / "checkpoints").is_dir():  # a job directory
        p = p / "checkpoints"
    dirs = _step_dirs(p)
    if not dirs:
        raise CheckpointError(f"{p} is not a checkpoint directory (no {STEP_PREFIX}_XXXXXXXXX step directories)")
    if step is None:
        steps = complete_steps(p, warn=True)
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {p} (step directories: {sorted(dirs)})")
        return p / step_name(steps[-1]), steps[-1]
    if int(step) not in dirs:
        raise CheckpointError(f"no checkpoint for step {step} in {p} (complete steps: {complete_steps(p, warn=False)})")
    return dirs[int(step)], int(step)


def _tree_metadata(item_dir: pathlib.Path):
    md = _ocp().PyTreeCheckpointer().metadata(item_dir)
    md = getattr(md, "item_metadata", md)  # StepMetadata(item_metadata=TreeMetadata) in 0.12
    return getattr(md, "tree", md)


def read_stats(step_dir: str | os.PathLike) -> dict | None:
    """The reference bookkeeping saved with a step (train_stats: {"net": {...}, "net_ema": {...}}), or None where
    the step has none (written before it was kept). A malformed item is a CheckpointError naming it."""
    d = pathlib.Path(step_dir) / "stats"
    if not d.is_dir():
        return None
    ocp = _ocp()
    try:
        raw = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(d, args=ocp.args.JsonRestore())
        return train_stats.validate(raw, str(d))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"reading {d} failed: {type(e).__name__}: {e}") from e


def no_stats_note(step_dir: str | os.PathLike) -> str:
    """The line saying a step has no stats/ (read_stats gave None); callers add what they do instead."""
    return f"note: {step_dir} has no stats/ item (written before the accum_* bookkeeping was kept)"


def read_model(path: str | os.PathLike, step: int | None = None) -> tuple[dict, dict, int]:
    """(model, config, step) of a checkpoint, as numpy on the host: no mesh, no train config, one copy of the weights.

    `path`: a step directory (`.../iter_000000200`), a checkpoints directory (then `step`, default the latest
    complete one) or a job directory holding `checkpoints/`. bf16 weights come back as `ml_dtypes.bfloat16`.
    """
    ocp = _ocp()
    step_dir, found = _resolve_step_dir(path, step)
    why = damage(step_dir)
    if why is not None:
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: {why}")
    tree = _tree_metadata(step_dir / "model")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    try:
        model = ocp.PyTreeCheckpointer().restore(step_dir / "model",
                                                 args=ocp.args.PyTreeRestore(restore_args=restore_args))
        config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config",
                                                                      args=ocp.args.JsonRestore())
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"reading checkpoint {step_dir} failed: {type(e).__name__}: {e}") from e
    return model, dict(config), found
