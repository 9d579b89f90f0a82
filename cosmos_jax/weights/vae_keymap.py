"""Reference Wan2.1 VAE state-dict names (`tokenizer.pth`, 194 tensors) <-> the Flax tree of `models.wan_vae.WanVAE`.

The Flax modules carry the reference names with `_` for `.` before an index (`encoder.downsamples.3.residual.2`
-> `encoder/downsamples_3/residual_2`), so the mapping is mechanical:
  * Conv3d `weight` (O, I, kT, kH, kW) <-> `kernel` (kT, kH, kW, I, O); Conv2d (O, I, kH, kW) <-> (kH, kW, I, O)
    (both frameworks cross-correlate: no kernel flip);
  * RMS_norm `gamma` (C, 1, 1, 1), or (C, 1, 1) in the attention blocks' `norm`, <-> (C,);
  * `bias` unchanged.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Mapping

import jax
import numpy as np

from cosmos_jax.models import wan_vae
from cosmos_jax.weights import torch_io


class VAEWeightsError(ValueError):
    """A VAE checkpoint that does not match the configured network (lists the offending keys)."""


def _ref_key(path: tuple[str, ...]) -> str:
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    leaf = {"kernel": "weight"}.get(path[-1], path[-1])
    return ".".join(parts + [leaf])


def _ref_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return (shape[-1], shape[-2]) + tuple(shape[:-2])
    if path[-1] == "gamma":
        return (shape[0],) + (1,) * (2 if path[-2] == "norm" else 3)
    return tuple(shape)


def _to_flax(arr: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] == "kernel":  # (O, I, *k) -> (*k, I, O)
        return np.transpose(arr, tuple(range(2, arr.ndim)) + (1, 0))
    if path[-1] == "gamma":
        return arr.reshape(-1)
    return arr


def _to_ref(arr: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] == "kernel":  # (*k, I, O) -> (O, I, *k)
        return np.transpose(arr, (arr.ndim - 1, arr.ndim - 2) + tuple(range(arr.ndim - 2)))
    if path[-1] == "gamma":
        return arr.reshape(_ref_shape(path, arr.shape))
    return arr


def _flax_leaves(cfg: wan_vae.WanVAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    abstract = jax.eval_shape(functools.partial(wan_vae.init_params, cfg))
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {tuple(k.key for k in kp): tuple(v.shape) for kp, v in flat}


def reference_shapes(cfg: wan_vae.WanVAEConfig) -> dict[str, tuple[int, ...]]:
    """Every reference key of the configured VAE with its PyTorch shape (194 keys for the Wan2.1 layout)."""
    return {_ref_key(p): _ref_shape(p, s) for p, s in _flax_leaves(cfg).items()}


def reference_to_flax(state: Mapping[str, np.ndarray], cfg: wan_vae.WanVAEConfig, source: str = "state dict") -> dict:
    """Flax params (float32) from a reference state dict; every missing/unexpected/mis-shaped key is an error."""
    leaves = _flax_leaves(cfg)
    by_key = {_ref_key(p): p for p in leaves}
    missing = sorted(set(by_key) - set(state))
    unexpected = sorted(set(state) - set(by_key))
    bad_shape = [f"{k}: file {tuple(np.shape(state[k]))} vs model {_ref_shape(by_key[k], leaves[by_key[k]])}"
                 for k in sorted(set(by_key) & set(state))
                 if tuple(np.shape(state[k])) != _ref_shape(by_key[k], leaves[by_key[k]])]
    if missing or unexpected or bad_shape:
        msg = [f"{source}: does not match the Wan2.1 VAE (dim={cfg.dim}, z_dim={cfg.z_dim})"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shape)):
            if items:
                more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
                msg.append(f"  {title} ({len(items)}): {', '.join(items[:8])}{more}")
        raise VAEWeightsError("\n".join(msg))
    params: dict = {}
    for key, path in by_key.items():
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(_to_flax(np.asarray(state[key]).astype(np.float32), path))
    return params


def flax_to_reference(params) -> dict[str, np.ndarray]:
    """Reference-named numpy state dict (PyTorch layouts) from Flax params."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for kp, v in flat:
        path = tuple(k.key for k in kp)
        out[_ref_key(path)] = np.ascontiguousarray(_to_ref(np.asarray(v), path))
    return out


def infer_config(state: Mapping[str, np.ndarray], **overrides) -> wan_vae.WanVAEConfig:
    """The base width `dim` and `z_dim` read off a state dict (`encoder.conv1.weight`, `conv2.weight`)."""
    for key in ("encoder.conv1.weight", "conv2.weight"):
        if key not in state:
            raise VAEWeightsError(f"state dict has no '{key}'; not a Wan2.1 VAE checkpoint")
    return wan_vae.WanVAEConfig(dim=int(np.shape(state["encoder.conv1.weight"])[0]),
                                z_dim=int(np.shape(state["conv2.weight"])[0]), **overrides)


def load_vae_params(path: str | os.PathLike, cfg: wan_vae.WanVAEConfig | None = None, **overrides):
    """(params, cfg) from a `tokenizer.pth` / `.safetensors`; cfg inferred from the file when not given."""
    state = torch_io.load_state_dict(path)
    cfg = cfg or infer_config(state, **overrides)
    return reference_to_flax(state, cfg, source=os.fspath(path)), cfg
