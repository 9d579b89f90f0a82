"""Reading reference weight files into numpy (safetensors, or `.pt` through torch, imported lazily here only)."""

from __future__ import annotations

import os
from typing import Any

import ml_dtypes
import numpy as np


class WeightFileError(ValueError):
    """A weight file that cannot be read as a flat tensor state dict."""


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat {name: numpy array} from a `.safetensors` or a `.pt`/`.pth` file (`torch.load(weights_only=True)`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{path}: no such weight file")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            out = {}
            with safe_open(path, framework="np") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
            return out
        except Exception as e:  # safetensors raises several types for corrupt headers/data
            raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from e
    if path.endswith((".pt", ".pth")):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightFileError(f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}: {e})") from e
        return _flatten_torch(obj, path)
    raise WeightFileError(f"{path}: unknown weight file type (expected .safetensors, .pt or .pth)")


def _flatten_torch(obj: Any, path: str) -> dict[str, np.ndarray]:
    import torch

    if not isinstance(obj, dict):
        raise WeightFileError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out, bad = {}, []
    for key, val in obj.items():
        if isinstance(val, torch.Tensor):
            out[key] = _torch_to_numpy(val)
        else:
            bad.append(f"{key} ({type(val).__name__})")
    if bad:
        raise WeightFileError(f"{path}: entries that are not tensors: {bad[:10]}")
    return out
