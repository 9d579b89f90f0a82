"""Export a training checkpoint to the reference's `.pt` files (issue #12).

    python tools/export.py <job>/checkpoints OUT_DIR                  # ours (Orbax): the latest complete step
    python tools/export.py $CHECKPOINT_DIR/model $CHECKPOINT_DIR        # the reference's DCP, as its converter

Writes, as the reference's `scripts/convert_distcp_to_pt.py` (reference_pipeline.md §3.3):
  model.pt            `net.*` (the weights as the trainer holds them) + `net_ema.*` (the EMA, fp32)
  model_ema_fp32.pt   the `net_ema.*` entries renamed to `net.*`
  model_ema_bf16.pt   the same with every float32 tensor cast to bf16 (the released `*_ema_bf16.pt` format)
  manifest.json       keys, dtypes, shapes and sha256 (of the raw bytes) of every tensor of every file, the network's
                      reference constructor kwargs, the source checkpoint and step
(`ema=False`: model.pt only, as the converter's `--no-ema`.)

Sources (`detect_source`):
  * DCP (the reference trainer's `model/` dir with `.metadata`, an `iter_*` dir or a `checkpoints/` dir with
    `latest_checkpoint.txt`): every tensor copied as stored, in the stored order — the same keys (incl. TE
    `_extra_state`), dtypes, shapes and bytes as the reference converter.
  * Orbax (ours, training/checkpoint.py: a `checkpoints/` manager dir -> the latest complete step, or a step dir):
    `net.*` = trainable fp32 master weights cast to the run's `model.weight_dtype` (bf16 for real runs, as the
    reference's LowPrecisionCallback holds `net`) + the frozen base as stored; `net_ema.*` = the EMA in fp32, the
    frozen base upcast (the EMA of a frozen weight is the weight). RoPE buffers as the reference computes them
    (following `model.rope_ranges_bf16`; cast with the rest of `net` to its dtype, as `net.to(bf16)` does), the
    `accum_*` bookkeeping scalars of each network as the run kept them (training/train_stats.py: the reference's
    values continued from the starting weights; 0 for checkpoints written before they were kept) and empty uint8
    TE `_extra_state` entries, in the
    reference's state-dict order: the key set of the reference converter's files for the same network.

Files are written tensor by tensor (one tensor in memory beyond the source) by a streaming `torch.save`
(`weights/torch_save.py`: the same zip records as `torch.save`), into a temporary directory inside OUT_DIR, and renamed
to their final names only when every file is complete: an interrupted export leaves the previous files untouched
and no partial file under a final name. torch is imported lazily (weight-file code only).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import re
import secrets
import shutil
import socket
import sys
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from cosmos_jax.models import rope as rope_lib
from cosmos_jax.models import dit_config as dit_config_lib
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.weights import dcp_io, keymap
from cosmos_jax.weights.torch_save import TorchSaveWriter, contiguous

MODEL_PT = "model.pt"
EMA_FP32_PT = "model_ema_fp32.pt"
EMA_BF16_PT = "model_ema_bf16.pt"
MANIFEST = "manifest.json"
NET, NET_EMA = "net.", "net_ema."
MANIFEST_FORMAT = "cosmos_jax.export/1"
_TMP_PREFIX = ".export-tmp-"
BF16 = np.dtype(ml_dtypes.bfloat16)


class ExportError(ValueError):
    """A source that cannot be exported, or an output directory that cannot take the files."""


# ------------------------------------------------------------------------------------------------ dtype casts

def to_bf16(arr: np.ndarray) -> np.ndarray:
    """float32 -> bf16 exactly as torch's `.bfloat16()` (round to nearest even, torch's NaN handling)."""
    import torch

    t = torch.from_numpy(contiguous(np.asarray(arr, np.float32))).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(BF16)


def cast(arr: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if arr.dtype == dtype:
        return arr
    if dtype == BF16 and arr.dtype == np.float32:
        return to_bf16(arr)
    if dtype == np.float32 and arr.dtype == BF16:  # exact; torch's kernel is much faster than ml_dtypes' astype
        import torch

        return torch.from_numpy(contiguous(arr).view(np.int16)).view(torch.bfloat16).float().numpy()
    return arr.astype(dtype)


def transposed(arr: np.ndarray) -> np.ndarray:
    """`arr.T` in C order. Copied by torch on a same-width integer view: a blocked, multi-threaded copy (numpy's
    strided copy of an ml_dtypes bf16 array goes element by element)."""
    import torch

    if arr.ndim < 2:
        return contiguous(arr)
    ints = np.asarray(arr).view(np.dtype(f"int{arr.dtype.itemsize * 8}"))
    return torch.from_numpy(ints).T.contiguous().numpy().view(arr.dtype)


# ------------------------------------------------------------------------------------------------ reference layout

# The order of names among siblings in the reference's `state_dict()` (module registration order; checked against
# the DCP fixture written by the reference trainer). Numeric names sort numerically.
_NAME_ORDER = {name: i for i, name in enumerate((
    "accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration", "accum_train_in_hours",
    "x_embedder", "proj", "pos_embedder_options", "n_cameras", "seq", "dim_spatial_range", "dim_temporal_range",
    "t_embedder", "linear_1", "linear_2", "final_layer", "linear", "adaln_modulation", "t_embedding_norm",
    "crossattn_proj", "input_hint_block", "control_embedder", "blocks", "control_blocks", "view_embeddings",
    "self_attn", "mlp", "layer1", "layer2", "adaln_modulation_self_attn", "adaln_modulation_cross_attn",
    "adaln_modulation_mlp", "before_proj", "after_proj", "cross_attn",
    "q_proj", "q_norm", "k_proj", "k_norm", "v_proj", "output_proj", "attn_op",
    "weight", "bias", "_extra_state"))}
_NUMBERED = re.compile(r"^(n_cameras)_(\d+)$")


def _order_key(key: str) -> tuple:
    out = []
    for part in key.split("."):
        if part.isdigit():
            out.append((1, int(part)))
            continue
        m = _NUMBERED.match(part)
        name, num = (m.group(1), int(m.group(2))) if m else (part, 0)
        if name not in _NAME_ORDER:
            raise KeyError(f"no reference order for {part!r} in {key}")
        out.append((0, _NAME_ORDER[name], num))
    return tuple(out)


def reference_order(keys) -> list[str]:
    """`keys` (no prefix) in the order of the reference network's `state_dict()`."""
    return sorted(keys, key=_order_key)


def extra_state_keys(cfg: DiTConfig) -> list[str]:
    """The TE modules' `_extra_state` keys of the reference network (empty uint8 tensors without FP8)."""
    out = ["t_embedding_norm._extra_state"]
    for stack, n in (("blocks", cfg.num_blocks), ("control_blocks", cfg.num_control_blocks)):
        for i in range(n):
            out += [f"{stack}.{i}.{attn}.{norm}._extra_state" for attn in ("self_attn", "cross_attn")
                    for norm in ("q_norm", "k_norm")]
            out.append(f"{stack}.{i}.cross_attn.attn_op._extra_state")
    return out


# Reference kwargs that only steer PyTorch execution: the values of the released 2B network
# (`constructor_kwargs_real_2B` of the parity fixture), recorded so the manifest is a complete constructor call.
_REFERENCE_EXECUTION_KWARGS = {"atten_backend": "minimal_a2a", "n_cameras": 3, "pos_emb_learnable": True,
                               "pos_emb_interpolation": "crop", "sac_config": {"mode": "predict2_2b_720_aggressive"},
                               "use_wan_fp32_strategy": True}
_NOT_REFERENCE_KWARGS = {"mlp_ratio", "hint_layers", "crossattn_tokens_per_view", "rope_ranges_bf16", "dtype",
                         "param_dtype", "attention_backend", "remat_policy"}


def reference_kwargs(cfg: DiTConfig) -> dict:
    """The reference `MultiViewControlDiT(**kwargs)` that builds this network (inverse of
    `DiTConfig.from_reference_kwargs`)."""
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_REFERENCE_KWARGS}
    kw.update(dit_config_lib._FIXED_REFERENCE_OPTIONS)
    kw.update(_REFERENCE_EXECUTION_KWARGS)
    if cfg.mlp_ratio != 4.0:
        kw["mlp_ratio"] = cfg.mlp_ratio
    if cfg.hint_layers != DiTConfig.hint_layers:
        kw["hint_nf"] = [cfg.model_channels] * (cfg.hint_layers + 1)
    return json.loads(json.dumps(kw))


def _network_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """What a DCP's tensor shapes say about the network (a DCP holds no config)."""
    def get(key):
        return shapes.get(NET + key)

    out = {}
    blocks = {int(k.split(".")[2]) for k in shapes if k.startswith(NET + "blocks.")}
    control = {int(k.split(".")[2]) for k in shapes if k.startswith(NET + "control_blocks.")}
    if get("x_embedder.proj.1.weight"):
        out["model_channels"] = int(get("x_embedder.proj.1.weight")[0])
    if blocks:
        out["num_blocks"] = len(blocks)
    if control:
        out["num_control_blocks"] = len(control)
        if blocks:
            out["vace_block_every_n"] = len(blocks) // len(control)
    if get("blocks.0.self_attn.q_norm.weight") and "model_channels" in out:
        out["num_heads"] = out["model_channels"] // int(get("blocks.0.self_attn.q_norm.weight")[0])
    if get("blocks.0.adaln_modulation_self_attn.1.weight"):
        out["adaln_lora_dim"] = int(get("blocks.0.adaln_modulation_self_attn.1.weight")[0])
    if get("crossattn_proj.0.weight"):
        out["crossattn_emb_channels"], out["crossattn_proj_in_channels"] = map(int, get("crossattn_proj.0.weight"))
    return out


# ------------------------------------------------------------------------------------------------ sources

@dataclasses.dataclass
class Record:
    """One tensor of model.pt: name, dtype, shape, and how to make it (called once, in order)."""
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]


@dataclasses.dataclass
class Source:
    kind: str                 # "orbax" | "dcp"
    path: pathlib.Path        # the step dir (orbax) or the model/ dir (dcp)
    step: int | None
    network: dict
    records: list[Record]     # model.pt, in order
    close: Callable[[], None] = lambda: None


@dataclasses.dataclass(frozen=True)
class SourceRef:
    kind: str                 # "orbax" | "dcp"
    path: pathlib.Path        # as given (orbax: read_model resolves it) or the model/ dir (dcp)
    step: int | None


_STEP_DIR = re.compile(r"iter_\d+")


def _has_step_dirs(p: pathlib.Path) -> bool:
    return p.is_dir() and any(_STEP_DIR.fullmatch(d.name) and d.is_dir() for d in p.iterdir())


def _orbax_step_dir(path: pathlib.Path, step: int) -> pathlib.Path:
    """The step directory read_model read: `path` itself, or `path`[/checkpoints]/iter_<step>."""
    from cosmos_jax.training import checkpoint as ckpt_lib

    name = ckpt_lib.step_name(step)
    if path.name == name:
        return path
    for cand in (path / name, path / "checkpoints" / name):
        if cand.is_dir():
            return cand
    return path


def detect_source(path: str | os.PathLike, step: int | None = None) -> SourceRef:
    """Which kind of checkpoint `path` is: DCP (a model/ dir with .metadata or .distcp files, an iter_* dir with
    such a model/, a checkpoints dir leading to one) or Orbax (ours: a step dir or a checkpoints/job dir)."""
    from cosmos_jax.training import checkpoint as ckpt_lib

    p = pathlib.Path(path).absolute()
    if not p.exists():
        raise ExportError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise ExportError(f"{p}: is a file, not a checkpoint directory (an Orbax checkpoints/ or iter_* directory, "
                          "or a DCP model/ directory with .metadata)")
    if dcp_io.looks_like_dcp(p):
        model_dir, found = dcp_io.resolve(p, step)
        return SourceRef("dcp", model_dir, found)
    orbax_markers = (ckpt_lib.STEP_METADATA, ckpt_lib.COMMIT_MARKER, "model/_METADATA", ckpt_lib.LATEST_FILE)
    if any((p / m).exists() for m in orbax_markers) or _has_step_dirs(p) or _has_step_dirs(p / "checkpoints"):
        return SourceRef("orbax", p, step)
    if _STEP_DIR.fullmatch(p.name):
        return SourceRef("orbax", p, step)  # read_model says what is missing
    raise ExportError(f"{p}: not a checkpoint: neither an Orbax checkpoint (checkpoints/ with iter_* step directories, "
                      "or one step directory) nor a DCP checkpoint (model/ with .metadata, an iter_* directory or "
                      "checkpoints/ with latest_checkpoint.txt)")


def _open_dcp(ref: SourceRef) -> Source:
    reader = dcp_io.DcpReader(ref.path)
    records = [Record(k, reader.numpy_dtype(k), reader.shape(k), (lambda k=k: reader.read_numpy(k)))
               for k in reader.keys()]
    network = {"reference_class": "MultiViewControlDiT",
               "inferred_from_tensor_shapes": _network_from_shapes({k: reader.shape(k) for k in reader.keys()}),
               "note": "a DCP checkpoint holds no config: these are the architecture sizes its tensors imply"}
    return Source("dcp", ref.path, ref.step, network, records, reader.close)


class _LeafPool:
    """The checkpoint's arrays by (tree, flax path); each is dropped after its last use, so memory falls as the
    export proceeds."""

    def __init__(self):
        self.arrays: dict[tuple, np.ndarray] = {}
        self.uses: collections.Counter = collections.Counter()

    def add(self, tree_name: str, tree: Mapping) -> None:
        import jax

        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            self.arrays[(tree_name,) + tuple(p.key for p in path)] = leaf

    def take(self, key: tuple, layer: int | None) -> np.ndarray:
        arr = self.arrays[key]
        out = arr if layer is None else arr[layer]
        self.uses[key] -= 1
        if self.uses[key] == 0:
            del self.arrays[key]
        return out


def shape_config(cfg: DiTConfig) -> DiTConfig:
    """`cfg` with execution options that do not change any parameter shape set to ones every host can trace
    (tracing the `cudnn` attention backend needs a GPU; an export runs on a CPU machine)."""
    return dataclasses.replace(cfg, attention_backend="xla", remat_policy="none")


@functools.lru_cache(maxsize=8)
def _param_shapes(cfg: DiTConfig) -> dict:
    import jax

    from cosmos_jax.models import dit as dit_lib

    return {tuple(p.key for p in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(dit_lib.abstract_params(cfg))}


def param_shapes(cfg: DiTConfig) -> dict:
    """{flax path tuple: shape} of the network's parameters (traced once per config, on any host)."""
    return _param_shapes(shape_config(cfg))


def check_tree(tree: Mapping, want: Mapping[tuple, tuple], where: str) -> None:
    """`tree`'s leaves have exactly the paths and shapes of `want` ({path tuple: shape}); else WeightsError listing
    every difference."""
    import jax

    got = {tuple(p.key for p in path): tuple(np.shape(x)) for path, x in jax.tree_util.tree_leaves_with_path(tree)}
    missing = sorted("/".join(k) for k in want.keys() - got.keys())
    unexpected = sorted("/".join(k) for k in got.keys() - want.keys())
    shapes = sorted(f"{'/'.join(k)}: {got[k]} vs {want[k]}" for k in got.keys() & want.keys() if got[k] != want[k])
    if missing or unexpected or shapes:
        raise keymap.WeightsError(f"{where}: does not match the network of its config: missing {missing[:20]}, "
                                  f"unexpected {unexpected[:20]}, shape mismatches {shapes[:20]}")


def dit_config_of_run(config: Mapping, where: str) -> DiTConfig:
    """The DiTConfig of a saved run config (its `model` section)."""
    import ml_collections

    from cosmos_jax import build

    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise ExportError(f"{where}: the checkpoint's config has no 'model' section")
    try:
        return build.dit_config_from(ml_collections.ConfigDict(dict(config["model"])))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError(f"{where}: the checkpoint's model config does not build a network ({type(e).__name__}: "
                          f"{e})") from e


def _open_orbax(ref: SourceRef, *, ema: bool) -> Source:
    import jax

    from cosmos_jax import build
    from cosmos_jax.training import checkpoint as ckpt_lib

    model, config, step = ckpt_lib.read_model(ref.path, ref.step)
    step_dir = _orbax_step_dir(ref.path, step)
    cfg = dit_config_of_run(config, str(step_dir))
    weight_dtype = np.dtype(config["model"].get("weight_dtype", "bfloat16"))
    for item in ("trainable", "frozen"):
        if item not in model:
            raise ExportError(f"{step_dir}: the model item has no '{item}' weights (found {sorted(model)})")
    if ema and "ema" not in model:
        raise ExportError(f"{step_dir}: holds no EMA weights (the run had ema.enabled=False); export with --no-ema")
    names = build.trainable_names(cfg)
    stats = ckpt_lib.read_stats(step_dir)
    if stats is None:  # a checkpoint from before the bookkeeping was kept: said, not silent
        print(f"{ckpt_lib.no_stats_note(step_dir)}: the export's accum_* buffers are 0", file=sys.stderr)
        stats = {}
    check_tree(build.merge_params(model["trainable"], model["frozen"]), param_shapes(cfg), str(step_dir))
    if set(model["trainable"]) != set(names):
        raise keymap.WeightsError(f"{step_dir}: trainable weights {sorted(model['trainable'])} differ from the "
                                  f"control branch {sorted(names)}")
    if ema:
        check_tree(model["ema"], {tuple(p.key for p in path): x.shape
                                  for path, x in jax.tree_util.tree_leaves_with_path(model["trainable"])},
                   f"{step_dir} (ema)")

    pool = _LeafPool()
    for item in ("trainable", "frozen") + (("ema",) if ema else ()):
        pool.add(item, model[item])
    del model  # the pool holds the only references: leaves are freed after their last use

    # keymap's one name table: (flax path, reference key, transposed or copied, layer of a stacked leaf)
    by_key = {e.ref_key: e for e in keymap._entries(cfg)}

    def ref_shape(e) -> tuple:  # the PyTorch shape of one reference tensor
        shape = param_shapes(cfg)[tuple(e.flax_path)][1 if e.stack is not None else 0:]
        return tuple(reversed(shape)) if e.kind == "linear" else shape

    spatial, temporal = rope_lib.rope_ranges(cfg)
    rope = {"seq": np.arange(cfg.rope_max_len, dtype=np.float32), "dim_spatial_range": spatial,
            "dim_temporal_range": temporal}
    keys = (list(by_key) + [f"pos_embedder_options.n_cameras_{n}.{b}" for n in range(1, keymap.N_ROPE_OPTIONS + 1)
                            for b in rope] + list(keymap.ACCUM_KEYS) + extra_state_keys(cfg))
    keys = reference_order(keys)

    def spec(key: str, float_dtype) -> tuple[np.dtype, tuple]:
        if key in by_key:
            return np.dtype(float_dtype), ref_shape(by_key[key])
        if key.startswith("pos_embedder_options."):
            return np.dtype(float_dtype), rope[key.rsplit(".", 1)[1]].shape
        if key == "accum_train_in_hours":
            return np.dtype(float_dtype), ()
        if key in keymap.ACCUM_KEYS:
            return np.dtype(np.int64), ()
        return np.dtype(np.uint8), (0,)  # _extra_state

    def accum(key: str, weights: str):  # net.* <- the trained network's bookkeeping, net_ema.* <- the EMA's
        return stats.get("net_ema" if weights == "ema" else "net", {}).get(key, 0)

    def produce(key: str, weights: str, float_dtype) -> np.ndarray:
        if key in by_key:
            e = by_key[key]
            item = weights if e.flax_path[0] in names else "frozen"
            arr = pool.take((item,) + tuple(e.flax_path), e.layer)
            return cast(transposed(arr) if e.kind == "linear" else contiguous(arr), float_dtype)
        if key.startswith("pos_embedder_options."):
            return cast(rope[key.rsplit(".", 1)[1]], float_dtype)
        if key == "accum_train_in_hours":
            return cast(np.asarray(accum(key, weights), np.float32), float_dtype)
        if key in keymap.ACCUM_KEYS:
            return np.asarray(accum(key, weights), np.int64)
        return np.zeros((0,), np.uint8)

    passes = [(NET, "trainable", weight_dtype)] + ([(NET_EMA, "ema", np.float32)] if ema else [])
    records = []
    for prefix, weights, float_dtype in passes:
        for key in keys:
            if key in by_key:
                e = by_key[key]
                item = weights if e.flax_path[0] in names else "frozen"
                pool.uses[(item,) + tuple(e.flax_path)] += 1
            dtype, shape = spec(key, float_dtype)
            records.append(Record(prefix + key, dtype, tuple(shape),
                                  (lambda key=key, w=weights, d=float_dtype: produce(key, w, d))))
    network = {"reference_class": "MultiViewControlDiT", "reference_kwargs": reference_kwargs(cfg),
               "rope_ranges_bf16": cfg.rope_ranges_bf16, "weight_dtype": weight_dtype.name,
               "run_config_model": json.loads(json.dumps(dict(config["model"])))}
    return Source("orbax", step_dir, step, network, records)


def open_source(path: str | os.PathLike, *, step: int | None = None, ema: bool = True) -> Source:
    ref = detect_source(path, step)
    return _open_dcp(ref) if ref.kind == "dcp" else _open_orbax(ref, ema=ema)


# ------------------------------------------------------------------------------------------------ output staging

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Staging:
    """A temporary directory inside `out_dir`; `commit` renames its files over the final names (same file system,
    atomic per file), an exception removes it. Temporary directories of dead exports are removed on entry."""

    def __init__(self, out_dir: pathlib.Path):
        self.out_dir = out_dir
        self.dir: pathlib.Path | None = None

    def __enter__(self):
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"{self.out_dir}: cannot create the output directory ({e.strerror})") from e
        if not self.out_dir.is_dir():
            raise ExportError(f"{self.out_dir}: not a directory")
        host = socket.gethostname()
        for stale in self.out_dir.glob(_TMP_PREFIX + "*"):
            m = re.fullmatch(re.escape(_TMP_PREFIX) + r"(.+)-(\d+)-[0-9a-f]{8}", stale.name)
            if m and m.group(1) == host and not _pid_alive(int(m.group(2))):  # only exports of this host
                print(f"removing {stale} (left by an interrupted export)", file=sys.stderr)
                shutil.rmtree(stale, ignore_errors=True)
        self.dir = self.out_dir / f"{_TMP_PREFIX}{host}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.dir.mkdir()
        except OSError as e:
            raise ExportError(f"{self.out_dir}: not writable ({e.strerror})") from e
        return self

    def commit(self, names: list[str], remove: list[str] = ()) -> None:
        for name in names:
            os.replace(self.dir / name, self.out_dir / name)
        for name in remove:
            (self.out_dir / name).unlink(missing_ok=True)
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __exit__(self, *exc):
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc). Without it, the mix of blob, tensor and cast buffers of
    varying sizes fragments the heap (glibc's dynamic mmap threshold keeps buffers < 32 MiB on it) and the resident
    size creeps up with the number of tensors written (0.44 -> 1.1 GiB for a 0.7 B-parameter DCP)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _write_json(path: pathlib.Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ export

def export(src: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None, ema: bool = True,
           progress: bool = True) -> dict:
    """Write model.pt (+ model_ema_fp32.pt, model_ema_bf16.pt when `ema`) and manifest.json for the checkpoint
    `src` into `out_dir`; returns the manifest. Raises ExportError / CheckpointError / DcpError / WeightsError
    (all ValueError) naming the file for bad input; nothing under a final name changes unless the export completes.
    """
    from tqdm import tqdm

    out_dir = pathlib.Path(out_dir).absolute()
    source = open_source(src, step=step, ema=ema)
    try:
        records = source.records
        ema_records = [r for r in records if r.key.startswith(NET_EMA)]
        if ema and not ema_records:
            raise ExportError(f"{source.path}: holds no EMA weights ({NET_EMA}*); export with --no-ema")
        files = {MODEL_PT: [(r.key, r.dtype, r.shape) for r in records]}
        if ema:
            renamed = [(NET + r.key[len(NET_EMA):], r.dtype, r.shape) for r in ema_records]
            files[EMA_FP32_PT] = renamed
            files[EMA_BF16_PT] = [(k, BF16 if d == np.float32 else d, s) for k, d, s in renamed]
        total = sum(math.prod(s) * np.dtype(d).itemsize for entries in files.values() for _, d, s in entries)
        with _Staging(out_dir) as stage:
            free = shutil.disk_usage(stage.dir).free
            if total > free:
                raise ExportError(f"{out_dir}: the export needs {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            writers = {name: TorchSaveWriter(stage.dir / name, entries) for name, entries in files.items()}
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                      desc=f"export {source.kind} step {source.step}", file=sys.stderr) as bar:
                for rec in records:
                    arr = rec.produce()
                    sha = writers[MODEL_PT].write(rec.key, arr)
                    bar.update(arr.nbytes)
                    if ema and rec.key.startswith(NET_EMA):
                        key = NET + rec.key[len(NET_EMA):]
                        writers[EMA_FP32_PT].write(key, arr, sha)
                        low = to_bf16(arr) if arr.dtype == np.float32 else arr
                        writers[EMA_BF16_PT].write(key, low, None if low is not arr else sha)
                        bar.update(arr.nbytes + low.nbytes)
                        del low
                    del arr
                    _release_freed_memory()
                for w in writers.values():
                    w.close()
            manifest = {
                "format": MANIFEST_FORMAT,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": {"kind": source.kind, "path": str(source.path), "step": source.step},
                "ema": ema,
                "network": source.network,
                "sha256_of": "the tensor's raw little-endian bytes in C order",
                "files": {name: w.manifest() for name, w in writers.items()},
            }
            _write_json(stage.dir / MANIFEST, manifest)
            # EMA files first, model.pt, the manifest last; --no-ema removes stale EMA files (the reference
            # converter deletes them before converting).
            stale = [] if ema else [n for n in (EMA_FP32_PT, EMA_BF16_PT) if (out_dir / n).exists()]
            stage.commit([n for n in (EMA_BF16_PT, EMA_FP32_PT, MODEL_PT) if n in files] + [MANIFEST], stale)
            for n in stale:
                print(f"removed {out_dir / n} (from an earlier export; --no-ema writes model.pt only)",
                      file=sys.stderr)
        return manifest
    finally:
        source.close()

