"""A local Hugging Face Qwen2.5-VL checkpoint directory -> `QwenTextConfig` + the Flax tree of `QwenTextModel`.

Reads `config.json` (released flat layout or nested `text_config`) and `model.safetensors` or the shards listed in
`model.safetensors.index.json`. Language-model tensors are found under `model.language_model.` (current
transformers), `model.` (the released Cosmos-Reason1 / Qwen2.5-VL checkpoints) or no prefix (a bare text model);
`visual.*` and `lm_head.*` are not needed and skipped. q/k/v and gate/up are fused, layers stacked.
Nothing is downloaded: a missing file is an error naming it.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from cosmos_jax.models.text_encoder import QwenTextConfig


class CheckpointDirError(ValueError):
    """A model directory that lacks a file, or whose tensors do not match its config."""


def _need(model_dir: str, name: str) -> str:
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        raise CheckpointDirError(f"{path}: missing (expected in the local model directory {model_dir})")
    return path


def load_config(model_dir: str | os.PathLike, **overrides) -> QwenTextConfig:
    path = _need(os.fspath(model_dir), "config.json")
    with open(path) as f:
        return QwenTextConfig.from_hf_config(json.load(f), source=path, **overrides)


def _weight_files(model_dir: str) -> dict[str, list[str]]:
    """{file: [tensor names]} of the checkpoint's safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointDirError(f"{index}: no 'weight_map'")
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(_need(model_dir, fname), []).append(name)
        return files
    single = _need(model_dir, "model.safetensors")
    from safetensors import safe_open

    with safe_open(single, framework="flax") as f:
        return {single: list(f.keys())}


def _prefix(names) -> str:
    for p in ("model.language_model.", "model.", ""):
        if f"{p}embed_tokens.weight" in names:
            return p
    raise CheckpointDirError("no embed_tokens.weight under model.language_model., model. or the top level")


def load_params(model_dir: str | os.PathLike, cfg: QwenTextConfig) -> dict:
    """numpy Flax params (cfg.param_dtype) of `QwenTextModel` from the directory's safetensors."""
    from safetensors import safe_open

    model_dir = os.fspath(model_dir)
    files = _weight_files(model_dir)
    names = {n for ns in files.values() for n in ns}
    prefix = _prefix(names)
    L, D, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dt = np.dtype(cfg.param_dtype)
    q, kv = nh * dh, nkv * dh
    layer = {
        "input_layernorm": {"weight": np.zeros((L, D), dt)},
        "post_attention_layernorm": {"weight": np.zeros((L, D), dt)},
        "qkv_proj": {"kernel": np.zeros((L, D, q + 2 * kv), dt), "bias": np.zeros((L, q + 2 * kv), dt)},
        "o_proj": {"kernel": np.zeros((L, q, D), dt)},
        "gate_up_proj": {"kernel": np.zeros((L, D, 2 * I), dt)},
        "down_proj": {"kernel": np.zeros((L, I, D), dt)},
    }
    params = {"embed_tokens": None, "norm": {"weight": None}, "layers": layer}
    # reference name -> (where, expected HF shape)
    targets: dict[str, tuple] = {f"{prefix}embed_tokens.weight": (("embed_tokens",), (cfg.vocab_size, D)),
                                 f"{prefix}norm.weight": (("norm", "weight"), (D,))}
    cols = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    for i in range(L):
        b = f"{prefix}layers.{i}."
        targets[b + "input_layernorm.weight"] = (("input_layernorm", "weight", i), (D,))
        targets[b + "post_attention_layernorm.weight"] = (("post_attention_layernorm", "weight", i), (D,))
        for proj, (lo, hi) in cols.items():
            targets[b + f"self_attn.{proj}.weight"] = (("qkv_proj", "kernel", i, lo, hi), (hi - lo, D))
            targets[b + f"self_attn.{proj}.bias"] = (("qkv_proj", "bias", i, lo, hi), (hi - lo,))
        targets[b + "self_attn.o_proj.weight"] = (("o_proj", "kernel", i), (D, q))
        targets[b + "mlp.gate_proj.weight"] = (("gate_up_proj", "kernel", i, 0, I), (I, D))
        targets[b + "mlp.up_proj.weight"] = (("gate_up_proj", "kernel", i, I, 2 * I), (I, D))
        targets[b + "mlp.down_proj.weight"] = (("down_proj", "kernel", i), (D, I))
    lm = {n for n in names if n.startswith(prefix) and not n.startswith(("visual.", "model.visual.", "lm_head."))}
    if prefix == "model.":
        lm = {n for n in lm if not n.startswith("model.language_model.")}
    missing = sorted(set(targets) - names)
    unexpected = sorted(n for n in lm - set(targets) if not n.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise CheckpointDirError(f"{model_dir}: checkpoint does not match its config.json "
                                 f"(missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                                 f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''})")
    cpu = jax.devices("cpu")[0]
    for path, file_names in files.items():
        wanted = [n for n in file_names if n in targets]
        if not wanted:
            continue
        with jax.default_device(cpu), safe_open(path, framework="flax") as f:
            for name in wanted:
                arr = np.asarray(f.get_tensor(name))
                where, shape = targets[name]
                if arr.shape != shape:
                    raise CheckpointDirError(f"{path}: {name} has shape {arr.shape}, config.json implies {shape}")
                arr = arr.astype(dt)
                if where[0] == "embed_tokens":
                    params["embed_tokens"] = arr
                elif where[0] == "norm":
                    params["norm"]["weight"] = arr
                else:
                    block, leaf, i = where[:3]
                    dst = layer[block][leaf]
                    val = arr.T if leaf == "kernel" else arr  # torch Linear (out, in) -> (in, out)
                    if len(where) == 5:
                        dst[i, ..., where[3]:where[4]] = val
                    else:
                        dst[i] = val
    return params
