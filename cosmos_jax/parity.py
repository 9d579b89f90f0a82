"""Run a reference parity case (`case.json`, `weights.safetensors`, `inputs.npz`) through our DiT in fp32.

The case format is the one of `shared/parity/dit_control/*`: constructor kwargs under `constructor_kwargs_tiny`
(reference names), the net state dict with exact key names, and the forward inputs of the reference call.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.models import build, dit as dit_lib
from cosmos_jax.models.dit_config import DiTConfig

_INPUT_NAMES = ("x_B_C_T_H_W", "timesteps_B_T", "crossattn_emb", "latent_control_input",
                "condition_video_input_mask_B_C_T_H_W", "padding_mask", "view_indices_B_T")


def load_case_config(case_dir: str, **overrides) -> DiTConfig:
    path = os.path.join(case_dir, "case.json")
    with open(path) as f:
        case = json.load(f)
    if "constructor_kwargs_tiny" not in case:
        raise KeyError(f"{path}: no 'constructor_kwargs_tiny' field")
    return DiTConfig.from_reference_kwargs(case["constructor_kwargs_tiny"], dtype=jnp.float32, **overrides)


def load_case_inputs(inputs_path: str) -> dict:
    """Forward kwargs of our DiT from a reference `inputs.npz` (control_context_scale -> control_weight)."""
    data = np.load(inputs_path)
    missing = [k for k in _INPUT_NAMES + ("control_context_scale",) if k not in data.files]
    if missing:
        raise KeyError(f"{inputs_path}: missing inputs {missing}")
    args = {k: jnp.asarray(data[k]) for k in _INPUT_NAMES}
    args["control_weight"] = float(data["control_context_scale"])
    return args


def load_case_params(case_dir: str, cfg: DiTConfig, weights: str | None = None):
    params, cfg, _ = build.load_reference_params(weights or os.path.join(case_dir, "weights.safetensors"), cfg)
    return params, cfg


def run_dit_case(case_dir: str, *, weights: str | None = None, inputs: str | None = None,
                 capture_intermediates: bool = False, **overrides):
    """fp32 forward of a parity case; returns out_B_C_T_H_W (and the sown intermediates when asked)."""
    cfg = load_case_config(case_dir, **overrides)
    params, cfg = load_case_params(case_dir, cfg, weights)
    args = load_case_inputs(inputs or os.path.join(case_dir, "inputs.npz"))
    model = dit_lib.MultiViewControlDiT(cfg)
    with jax.default_matmul_precision("highest"):
        if capture_intermediates:
            out, state = model.apply({"params": params}, **args, mutable=["intermediates"])
            return np.asarray(out), jax.tree.map(np.asarray, state["intermediates"])
        return np.asarray(jax.jit(lambda p, a: model.apply({"params": p}, **a))(params, args))
