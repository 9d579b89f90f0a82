"""A streaming `torch.save`: one tensor at a time, the same zip records as `torch.save` (weights/export.py).

`torch.save` needs the whole state dict in memory; a 2B export would hold every tensor at once. `TorchSaveWriter`
writes the pickled state-dict structure first and then each tensor's bytes as its own zip record through torch's
own zip writer, so the file is what `torch.save` writes (tests compare the bytes) while only one tensor is held.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import pathlib
import pickle
import sys

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


class TorchSaveError(ValueError):
    """Tensors written out of the declared order, dtype or shape (a bug of the caller), or too few of them."""



# numpy dtype name -> the torch storage class torch.save records for it (`TypedStorage._pickle_storage_type`).
_STORAGE_CLASS = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
                  "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
                  "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
                  "complex64": "ComplexFloatStorage", "complex128": "ComplexDoubleStorage"}


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """torch's strides of a fresh contiguous tensor (a 0-sized dim counts as 1)."""
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


class _StorageRef:
    __slots__ = ("pid",)

    def __init__(self, pid):
        self.pid = pid


class _TensorRef:
    """Pickles as torch.save pickles a fresh contiguous CPU tensor (`Tensor._reduce_ex_internal`)."""
    __slots__ = ("storage", "shape")

    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        import torch

        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, _contiguous_strides(self.shape), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _StorageRef) else None


def state_dict_pickle(entries: list[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
    """The `data.pkl` record torch.save writes for a flat {key: contiguous CPU tensor} dict with these entries."""
    import io

    import torch

    obj = {}
    for i, (key, dtype, shape) in enumerate(entries):
        name = _STORAGE_CLASS.get(np.dtype(dtype).name)
        if name is None:
            raise TorchSaveError(f"{key}: dtype {np.dtype(dtype).name} cannot be written by this exporter")
        shape = tuple(int(s) for s in shape)
        # torch.save's persistent id: ("storage", storage type, key, location, numel)
        obj[key] = _TensorRef(_StorageRef(("storage", getattr(torch, name), str(i), "cpu", math.prod(shape))), shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=torch.serialization.DEFAULT_PROTOCOL).dump(obj)
    return buf.getvalue()


def contiguous(arr: np.ndarray) -> np.ndarray:
    """`arr` in C order (a copy only when needed; unlike np.ascontiguousarray, 0-d stays 0-d)."""
    arr = np.asarray(arr)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def raw_bytes(arr: np.ndarray) -> np.ndarray:
    """The tensor's bytes (C order, native = little-endian) as a flat uint8 view (a copy only if not contiguous)."""
    return contiguous(arr).reshape(-1).view(np.uint8)


def sha256_of(arr: np.ndarray) -> str:
    return hashlib.sha256(raw_bytes(arr).data).hexdigest()


class TorchSaveWriter:
    """`torch.save({key: tensor, ...}, path)` written one tensor at a time.

    w = TorchSaveWriter(path, [(key, dtype, shape), ...])   # writes the pickle (needs only dtypes and shapes)
    for key, arr in ...: w.write(key, arr)                   # in the declared order; returns the tensor's sha256
    w.close()                                                 # zip central directory; the file is complete

    The records are those of torch.save (torch's own zip writer, same `data.pkl`, `.format_version`,
    `.storage_alignment`, `byteorder`, `data/<i>`, aligned and CRC'd); `torch.load(weights_only=True)` reads it.
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, np.dtype, tuple[int, ...]]]):
        import torch

        self.path = pathlib.Path(path)
        self.entries = [(k, np.dtype(d), tuple(int(s) for s in shape)) for k, d, shape in entries]
        data = state_dict_pickle(self.entries)
        align = str(torch.serialization._get_storage_alignment())
        self._zip = torch._C.PyTorchFileWriter(str(self.path), torch.serialization.get_crc32_options(), int(align))
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(".storage_alignment", align, len(align))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._next = 0
        self.sha256: dict[str, str] = {}
        self.nbytes = sum(math.prod(s) * d.itemsize for _, d, s in self.entries)

    def write(self, key: str, arr: np.ndarray, sha256: str | None = None) -> str:
        import torch

        if self._next >= len(self.entries):
            raise TorchSaveError(f"{self.path}: more tensors than declared ({key})")
        want_key, want_dtype, want_shape = self.entries[self._next]
        if key != want_key or arr.dtype != want_dtype or tuple(arr.shape) != want_shape:
            raise TorchSaveError(f"{self.path}: tensor {self._next} is {key} {arr.dtype} {tuple(arr.shape)}, declared "
                              f"{want_key} {want_dtype} {want_shape}")
        raw = raw_bytes(arr)
        self._zip.write_record(f"data/{self._next}", torch.from_numpy(raw).untyped_storage(), raw.nbytes)
        digest = sha256 or hashlib.sha256(raw.data).hexdigest()
        self.sha256[key] = digest
        self._next += 1
        return digest

    def close(self) -> None:
        if self._next != len(self.entries):
            raise TorchSaveError(f"{self.path}: {self._next} of {len(self.entries)} tensors written")
        self._zip.write_end_of_file()
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())

    def manifest(self) -> dict:
        return {"bytes": self.path.stat().st_size,
                "tensors": [{"key": k, "dtype": d.name, "shape": list(s), "sha256": self.sha256[k]}
                            for k, d, s in self.entries]}
