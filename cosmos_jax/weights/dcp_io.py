"""Reading a torch.distributed.checkpoint (DCP) directory tensor by tensor, on one CPU process, without a process group.

The reference trainer saves `<job>/checkpoints/iter_XXXXXXXXX/model/` with DCP (`.metadata` + `__<rank>_0.distcp`,
reference_pipeline.md §3.2): `.metadata` is a pickled `torch.distributed.checkpoint.metadata.Metadata`; every chunk
of a tensor is a `torch.save` blob at a byte range of a `.distcp` file (several chunks per tensor when FSDP ranks
wrote slices). `DcpReader.read(key)` assembles one tensor from its chunks, so a caller can stream a checkpoint of any
size with one tensor in memory at a time. What it reads equals what torch's own
`format_utils.dcp_to_torch_save` puts in its state dict (same dtypes, shapes and bytes; tests/test_export.py).

Safety: `.metadata` is unpickled with an allow-list of the DCP metadata classes (torch itself uses plain
`pickle.load`); chunks are read with `torch.load(weights_only=True)`. torch is imported lazily (weight-file code only).
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import pickle
import re

import numpy as np

from cosmos_jax.weights import torch_io

METADATA_FILE = ".metadata"
LATEST_FILE = "latest_checkpoint.txt"   # the reference checkpointer's pointer file, "iter_XXXXXXXXX\n"
_STEP_RE = re.compile(r"iter_(\d+)")


class DcpError(ValueError):
    """A directory that is not a readable DCP checkpoint (the message names the file)."""


# ------------------------------------------------------------------------------------------------ locating

def is_model_dir(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / METADATA_FILE).is_file()


def _distcp_files(path: pathlib.Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.distcp")) if path.is_dir() else []


def looks_like_dcp(path: str | os.PathLike) -> bool:
    """True when `path` is (or holds) a DCP checkpoint: a model dir with `.metadata` or `.distcp` files, a step dir
    with such a `model/`, or a checkpoints dir whose `latest_checkpoint.txt` / `iter_*` dirs lead to one."""
    p = pathlib.Path(path)
    if not p.is_dir():
        return False
    if is_model_dir(p) or _distcp_files(p):
        return True
    if (p / "model").is_dir():
        return looks_like_dcp(p / "model")
    if (p / "checkpoints").is_dir() and not _step_dirs(p):  # a job directory
        return looks_like_dcp(p / "checkpoints")
    if (p / LATEST_FILE).is_file():
        name = (p / LATEST_FILE).read_text().strip()
        if name and (p / name).is_dir():
            return looks_like_dcp(p / name)
    return any(looks_like_dcp(d / "model") for d in _step_dirs(p).values())


def _step_dirs(p: pathlib.Path) -> dict[int, pathlib.Path]:
    out = {}
    if p.is_dir():
        for d in p.iterdir():
            m = _STEP_RE.fullmatch(d.name)
            if m and d.is_dir():
                out[int(m.group(1))] = d
    return out


def _step_of(model_dir: pathlib.Path) -> int | None:
    m = _STEP_RE.fullmatch(model_dir.parent.name)
    return int(m.group(1)) if m else None


def resolve(path: str | os.PathLike, step: int | None = None) -> tuple[pathlib.Path, int | None]:
    """(the `model/` DCP directory, its step or None) for a model dir, an `iter_*` dir, a checkpoints dir (the
    step named by `latest_checkpoint.txt`, or `step`) or a job dir holding `checkpoints/`."""
    p = pathlib.Path(path).absolute()
    if not p.exists():
        raise DcpError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise DcpError(f"{p}: not a directory (a DCP checkpoint is a directory with {METADATA_FILE})")
    if (p / "checkpoints").is_dir() and not (is_model_dir(p) or (p / "model").is_dir() or _step_dirs(p)):
        p = p / "checkpoints"  # a job directory
    if is_model_dir(p) or _distcp_files(p):
        model_dir = p
    elif (p / "model").is_dir():
        model_dir = p / "model"
    elif (p / LATEST_FILE).is_file() or _step_dirs(p):
        if step is not None:
            model_dir = p / f"iter_{int(step):09d}" / "model"
            if not model_dir.is_dir():
                raise DcpError(f"{p}: no DCP checkpoint for step {step} ({model_dir} does not exist; steps: "
                               f"{sorted(_step_dirs(p))})")
        elif (p / LATEST_FILE).is_file():
            name = (p / LATEST_FILE).read_text().strip()
            if not _STEP_RE.fullmatch(name):
                raise DcpError(f"{p / LATEST_FILE}: expected 'iter_XXXXXXXXX', found {name[:80]!r}")
            model_dir = p / name / "model"
            if not model_dir.is_dir():
                raise DcpError(f"{p / LATEST_FILE} names {name}, but {model_dir} does not exist")
        else:
            raise DcpError(f"{p}: no {LATEST_FILE}; name the step (--step) or pass an iter_* directory "
                           f"(steps: {sorted(_step_dirs(p))})")
    else:
        raise DcpError(f"{p}: not a DCP checkpoint (no {METADATA_FILE}, no model/, no {LATEST_FILE})")
    if not is_model_dir(model_dir):
        raise DcpError(f"{model_dir}: DCP directory without {METADATA_FILE} (an interrupted save or a partial copy; "
                       f"files: {_distcp_files(model_dir)[:8]})")
    found = _step_of(model_dir)
    if step is not None and found is not None and found != int(step):
        raise DcpError(f"{model_dir} holds step {found}, not {step}")
    return model_dir, found


# ------------------------------------------------------------------------------------------------ metadata

def _allowed_global(module: str, name: str):
    """The object a `.metadata` pickle may refer to, or None. Only DCP's own metadata records, torch dtypes,
    layouts, memory formats, torch.Size and paths (the writer's checkpoint_id)."""
    import torch

    if module == "torch.distributed.checkpoint.metadata":
        import torch.distributed.checkpoint.metadata as md

        obj = getattr(md, name, None)
        return obj if isinstance(obj, type) else None
    if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
        from torch.distributed.checkpoint import filesystem

        return filesystem._StorageInfo
    if module == "torch":
        obj = getattr(torch, name, None)
        if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
        return None
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout
    if module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        return getattr(pathlib, name)
    if (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                          ("copyreg", "_reconstructor"), ("builtins", "object")):
        import collections
        import copyreg

        return {"OrderedDict": collections.OrderedDict, "set": set, "frozenset": frozenset,
                "_reconstructor": copyreg._reconstructor, "object": object}[name]
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, source: str):
        super().__init__(f)
        self._source = source

    def find_class(self, module, name):
        obj = _allowed_global(module, name)
        if obj is None:
            raise DcpError(f"{self._source}: refers to {module}.{name}, which a DCP metadata file does not hold "
                           "(refused: only DCP metadata records are unpickled)")
        return obj


def read_metadata(model_dir: str | os.PathLike):
    """The `Metadata` of a DCP directory (allow-listed unpickling)."""
    path = pathlib.Path(model_dir) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, str(path)).load()
    except DcpError:
        raise
    except FileNotFoundError as e:
        raise DcpError(f"{path}: missing (a DCP directory without {METADATA_FILE})") from e
    except Exception as e:  # noqa: BLE001 — truncated/corrupt pickles raise many types
        raise DcpError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from e
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata):
        raise DcpError(f"{path}: holds a {type(md).__name__}, not DCP Metadata")
    return md


# ------------------------------------------------------------------------------------------------ reader

class DcpReader:
    """Tensors of one DCP `model/` directory, read one at a time.

    reader = DcpReader(".../iter_000000200/model")
    for key in reader.keys():            # the order torch's dcp_to_torch_save gives (the metadata's)
        t = reader.read(key)             # a contiguous CPU torch.Tensor, dtype and shape as saved
    """

    def __init__(self, model_dir: str | os.PathLike):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = pathlib.Path(model_dir).absolute()
        self.metadata = read_metadata(self.dir)
        self._tensors = {}
        other = []
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self._tensors[key] = md
            else:
                other.append(key)
        if other:
            raise DcpError(f"{self.dir}: entries that are not tensors ({len(other)}: {other[:10]}); a model "
                           "checkpoint holds tensors only")
        planner = self.metadata.planner_data or {}
        nested = [k for k in self._tensors if k in planner and tuple(planner[k]) != (k,)]
        if nested:
            raise DcpError(f"{self.dir}: a nested state dict (e.g. {nested[0]} -> {planner[nested[0]]}); a model "
                           "checkpoint is a flat {name: tensor} dict")
        self._chunks: dict[str, list] = {k: [] for k in self._tensors}
        for index, info in (self.metadata.storage_data or {}).items():
            if index.fqn in self._chunks:
                self._chunks[index.fqn].append((tuple(index.offset), info))
        for key, md in self._tensors.items():
            have = sum(math.prod(self._chunk_size(md, off)) for off, _ in self._chunks[key])
            if have != math.prod(md.size):
                raise DcpError(f"{self.dir}: the stored chunks of {key} cover {have} of its "
                               f"{math.prod(md.size)} elements (a partial checkpoint)")
        self._files: dict[str, object] = {}

    @staticmethod
    def _chunk_size(md, offsets) -> tuple[int, ...]:
        for c in md.chunks:
            if tuple(c.offsets) == offsets:
                return tuple(c.sizes)
        return (0,)

    # -- queries

    def keys(self) -> list[str]:
        return list(self._tensors)

    def dtype(self, key: str):
        """torch dtype of `key`."""
        return self._tensors[key].properties.dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].size)

    def numpy_dtype(self, key: str) -> np.dtype:
        return numpy_dtype_of(self.dtype(key))

    # -- data

    def _read_blob(self, rel: str, offset: int, length: int, key: str) -> bytes:
        f = self._files.get(rel)
        if f is None:
            path = self.dir / rel
            try:
                f = self._files[rel] = open(path, "rb")
            except OSError as e:
                raise DcpError(f"{path}: cannot open ({e.strerror}); needed for {key}") from e
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise DcpError(f"{self.dir / rel}: truncated: {key} needs bytes {offset}..{offset + length}, the file "
                           f"ends at {offset + len(data)}")
        return data

    def read(self, key: str):
        """The whole tensor `key` (torch, CPU, contiguous), assembled from its chunks."""
        import torch

        md = self._tensors.get(key)
        if md is None:
            raise DcpError(f"{self.dir}: no tensor {key!r}")
        out = None
        chunks = self._chunks[key]
        for offsets, info in chunks:
            if getattr(info, "transform_descriptors", None):
                raise DcpError(f"{self.dir}: {key} is stored with transforms {info.transform_descriptors} "
                               "(e.g. compression); not supported")
            blob = self._read_blob(info.relative_path, info.offset, info.length, key)
            try:
                t = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise DcpError(f"{self.dir / info.relative_path}: chunk of {key} at byte {info.offset} is not "
                               f"readable ({type(e).__name__}: {e})") from e
            del blob
            sizes = self._chunk_size(md, offsets)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != sizes or t.dtype != md.properties.dtype:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise DcpError(f"{self.dir / info.relative_path}: chunk of {key} at byte {info.offset} holds {got}, "
                               f"the metadata says {md.properties.dtype} {sizes}")
            if len(chunks) == 1 and sizes == tuple(md.size):
                return t.contiguous()
            if out is None:
                out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            view = out
            for dim, (o, s) in enumerate(zip(offsets, sizes)):
                view = view.narrow(dim, o, s)
            view.copy_(t)
            del t
        if out is None:  # a tensor without stored chunks (numel 0)
            out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        return out

    def read_numpy(self, key: str) -> np.ndarray:
        """`read(key)` as numpy (bf16 as ml_dtypes.bfloat16), sharing the tensor's memory."""
        return torch_io._torch_to_numpy(self.read(key))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def numpy_dtype_of(torch_dtype) -> np.dtype:
    import ml_dtypes
    import torch

    if torch_dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(torch.empty((), dtype=torch_dtype).numpy().dtype)
    except (TypeError, RuntimeError) as e:
        raise DcpError(f"tensor dtype {torch_dtype} has no numpy equivalent") from e


def load_state_dict(path: str | os.PathLike, *, prefix: str | None = None, step: int | None = None
                    ) -> tuple[dict[str, np.ndarray], pathlib.Path, int | None]:
    """({key: numpy} of the keys starting with `prefix` (all when None), model dir, step) of a DCP checkpoint."""
    model_dir, found = resolve(path, step)
    with DcpReader(model_dir) as reader:
        keys = [k for k in reader.keys() if prefix is None or k.startswith(prefix)]
        return {k: reader.read_numpy(k) for k in keys}, model_dir, found
