"""Reference PyTorch state-dict names <-> the Flax parameter tree of `MultiViewControlDiT`.

One table (`_TOP_LEVEL`, `_BLOCK`) states every correspondence once; both directions are derived from it.
Linear weights are PyTorch [out, in] and Flax [in, out]; per-block tensors are stacked on a leading layer axis
(`blocks.{l}.*` -> params['blocks']['block'][...][l], `control_blocks.{g}.*` -> params['control_blocks']...).

Non-parameter entries of reference checkpoints:
  * `*._extra_state` (Transformer Engine bookkeeping, empty): ignored.
  * `pos_embedder_options.n_cameras_{1..7}.{seq, dim_spatial_range, dim_temporal_range}`: RoPE buffers. We compute
    them; on import they must equal what `DiTConfig.rope_ranges_bf16` says (exact, or rounded to bf16 as in the
    `*_ema_bf16.pt` files). Loading never changes the config: a mismatch is an error naming the config field
    (`rope_ranges_of` tells which variant a file holds). Anything else is an error, never silently ignored.
  * `accum_*` scalars (training statistics of `WeightTrainingStat`): returned to the caller, written back on export.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from cosmos_jax.models import rope as rope_lib
from cosmos_jax.models.dit_config import DiTConfig


class WeightsError(ValueError):
    """A checkpoint does not match the network: lists every missing, unexpected or mis-shaped key."""


# (flax path, reference key, kind) with kind "linear" (transpose) or "copy".
_TOP_LEVEL: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("x_embedder", "kernel"), "x_embedder.proj.1.weight", "linear"),
    (("control_embedder", "kernel"), "control_embedder.proj.1.weight", "linear"),
    (("t_embedder_linear_1", "kernel"), "t_embedder.1.linear_1.weight", "linear"),
    (("t_embedder_linear_2", "kernel"), "t_embedder.1.linear_2.weight", "linear"),
    (("t_embedding_norm", "scale"), "t_embedding_norm.weight", "copy"),
    (("crossattn_proj", "kernel"), "crossattn_proj.0.weight", "linear"),
    (("crossattn_proj", "bias"), "crossattn_proj.0.bias", "copy"),
    (("control_before_proj", "kernel"), "control_blocks.0.before_proj.weight", "linear"),
    (("control_before_proj", "bias"), "control_blocks.0.before_proj.bias", "copy"),
    (("final_linear", "kernel"), "final_layer.linear.weight", "linear"),
    (("final_adaln_modulation", "down", "kernel"), "final_layer.adaln_modulation.1.weight", "linear"),
    (("final_adaln_modulation", "up", "kernel"), "final_layer.adaln_modulation.2.weight", "linear"),
    (("view_embeddings",), "view_embeddings.weight", "copy"),
)

_BLOCK: tuple[tuple[tuple[str, ...], str, str], ...] = tuple(
    [((attn, proj, "kernel"), f"{attn}.{proj}.weight", "linear")
     for attn in ("self_attn", "cross_attn") for proj in ("q_proj", "k_proj", "v_proj", "output_proj")]
    + [((attn, norm, "scale"), f"{attn}.{norm}.weight", "copy")
       for attn in ("self_attn", "cross_attn") for norm in ("q_norm", "k_norm")]
    + [(("mlp", "layer1", "kernel"), "mlp.layer1.weight", "linear"),
       (("mlp", "layer2", "kernel"), "mlp.layer2.weight", "linear")]
    + [((f"adaln_modulation_{s}", part, "kernel"), f"adaln_modulation_{s}.{idx}.weight", "linear")
       for s in ("self_attn", "cross_attn", "mlp") for part, idx in (("down", 1), ("up", 2))]
)
_CONTROL_ONLY = ((("after_proj", "kernel"), "after_proj.weight", "linear"),
                 (("after_proj", "bias"), "after_proj.bias", "copy"))

ACCUM_KEYS = ("accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration", "accum_train_in_hours")
_ROPE_RE = re.compile(r"^pos_embedder_options\.n_cameras_(\d+)\.(seq|dim_spatial_range|dim_temporal_range)$")
N_ROPE_OPTIONS = 7  # the reference builds pos_embedder_options for 1..7 cameras


@dataclasses.dataclass
class _Entry:
    flax_path: tuple
    ref_key: str
    kind: str
    stack: str | None = None  # "blocks" / "control_blocks": flax leaf has a leading layer axis
    layer: int | None = None


def _entries(cfg: DiTConfig) -> list[_Entry]:
    out = [_Entry(p, k, kind) for p, k, kind in _TOP_LEVEL]
    for i in range(cfg.hint_layers if cfg.use_input_hint_block else 0):
        out.append(_Entry((f"input_hint_block_{i}", "kernel"), f"input_hint_block.{2 * i}.weight", "linear"))
        out.append(_Entry((f"input_hint_block_{i}", "bias"), f"input_hint_block.{2 * i}.bias", "copy"))
    for layer in range(cfg.num_blocks):
        for p, k, kind in _BLOCK:
            out.append(_Entry(("blocks", "block") + p, f"blocks.{layer}.{k}", kind, "blocks", layer))
    for g in range(cfg.num_control_blocks):
        for p, k, kind in _BLOCK + _CONTROL_ONLY:
            out.append(_Entry(("control_blocks", "block") + p, f"control_blocks.{g}.{k}", kind, "control_blocks", g))
    return out


def reference_names(cfg: DiTConfig) -> dict[str, list[str]]:
    """Top-level Flax parameter name -> the reference state-dict keys stored under it."""
    out: dict[str, list[str]] = {}
    for e in _entries(cfg):
        out.setdefault(e.flax_path[0], []).append(e.ref_key)
    return out


def _to_flax(arr: np.ndarray, kind: str) -> np.ndarray:
    return arr.T if kind == "linear" else arr


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Reference key -> PyTorch shape, derived from the Flax model's abstract parameters."""
    shapes = flax_param_shapes(cfg)
    out = {}
    for e in _entries(cfg):
        shape = _get(shapes, e.flax_path)
        if e.stack is not None:
            shape = shape[1:]
        out[e.ref_key] = tuple(reversed(shape)) if e.kind == "linear" else tuple(shape)
    return out


def flax_param_shapes(cfg: DiTConfig):
    from cosmos_jax.models.dit import abstract_params  # local import: keymap stays importable without the model
    return jax.tree.map(lambda x: tuple(x.shape), abstract_params(cfg))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "net.") -> dict[str, Any]:
    """Keep `prefix`-keys (with the prefix removed) when any key has it, else return the dict as is."""
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def rope_ranges_of(state_dict: Mapping[str, Any], cfg: DiTConfig, *, source: str = "state dict",
                   prefix: str = "net.") -> bool | None:
    """Which RoPE range variant a reference state dict holds: True = bf16-rounded, False = exact, None = the file
    has no RoPE buffers or both variants are equal for this head_dim. Raises WeightsError on any other value."""
    sd = strip_prefix(state_dict, prefix)
    exact = dataclasses.replace(cfg, rope_ranges_bf16=False)
    spatial, temporal = rope_lib.rope_ranges(exact)
    want = {"seq": np.arange(cfg.rope_max_len, dtype=np.float32), "dim_spatial_range": spatial,
            "dim_temporal_range": temporal}
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in want.items()}
    verdicts = set()
    for key, arr in sd.items():
        m = _ROPE_RE.match(key)
        if not m:
            continue
        name = m.group(2)
        got = np.asarray(arr).astype(np.float32)
        if got.shape != want[name].shape:
            raise WeightsError(f"{source}: {key} has shape {got.shape}, expected {want[name].shape}")
        if np.array_equal(got, want[name]):
            if not np.array_equal(want[name], rounded[name]):
                verdicts.add(False)
        elif np.array_equal(got, rounded[name]):
            verdicts.add(True)
        else:
            raise WeightsError(f"{source}: RoPE buffer {key} differs from what this head_dim/max size gives "
                               f"(max |diff| {np.max(np.abs(got - want[name])):.3g}); the checkpoint does not match "
                               "the config")
    if len(verdicts) > 1:
        raise WeightsError(f"{source}: RoPE buffers are partly bf16-rounded and partly exact")
    return verdicts.pop() if verdicts else None


def reference_to_flax(state_dict: Mapping[str, Any], cfg: DiTConfig, *, source: str = "state dict",
                      prefix: str = "net."):
    """Map a reference state dict (numpy arrays, any float dtype) to Flax params (fp32 numpy by default).

    Returns (params, extras): `extras` holds the `accum_*` bookkeeping scalars. Raises WeightsError naming every
    problem at once, and when the RoPE buffers disagree with `cfg.rope_ranges_bf16`.
    """
    sd = strip_prefix(state_dict, prefix)
    sd = {k: v for k, v in sd.items() if not k.endswith("._extra_state")}
    rope_buffers = {k: v for k, v in sd.items() if _ROPE_RE.match(k)}
    extras = {k: np.asarray(sd[k]) for k in ACCUM_KEYS if k in sd}
    want_shapes = expected_shapes(cfg)
    missing, wrong_shape = [], []
    for key, shape in want_shapes.items():
        if key not in sd:
            missing.append(key)
        elif tuple(np.shape(sd[key])) != shape:
            wrong_shape.append(f"{key}: checkpoint {tuple(np.shape(sd[key]))} vs network {shape}")
    unexpected = sorted(set(sd) - set(want_shapes) - set(rope_buffers) - set(extras))
    if missing or wrong_shape or unexpected:
        lines = [f"{source}: does not match the network ({cfg.num_blocks} blocks, {cfg.num_control_blocks} control "
                 f"blocks, model_channels {cfg.model_channels})"]
        if missing:
            lines.append(f"  missing {len(missing)} keys: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys: {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
        if wrong_shape:
            lines.append(f"  {len(wrong_shape)} shape mismatches: {wrong_shape[:20]}")
        raise WeightsError("\n".join(lines))
    variant = rope_ranges_of(rope_buffers, cfg, source=source, prefix="")
    if variant is not None and variant != cfg.rope_ranges_bf16:
        raise WeightsError(f"{source}: the RoPE range buffers are {'bf16-rounded' if variant else 'exact'}, but the "
                           f"config says model.rope_ranges_bf16={cfg.rope_ranges_bf16}; set "
                           f"--config.model.rope_ranges_bf16={variant} (it is saved with the run's checkpoints)")

    params: dict = {}
    stacks: dict[tuple, list] = {}
    for e in _entries(cfg):
        arr = _to_flax(np.asarray(sd[e.ref_key]).astype(np.float32), e.kind)
        if e.stack is None:
            _set(params, e.flax_path, arr)
        else:
            stacks.setdefault(e.flax_path, []).append((e.layer, arr))
    for path, layers in stacks.items():
        _set(params, path, np.stack([a for _, a in sorted(layers, key=lambda t: t[0])]))
    return params, extras


def flax_to_reference(params, cfg: DiTConfig, *, extras: Mapping[str, Any] | None = None,
                      dtype=np.float32) -> dict[str, np.ndarray]:
    """Flax params -> reference state dict (numpy, without prefix), including RoPE and accum buffers.

    `dtype` is applied to every floating-point tensor (the reference's bf16 export casts buffers too).
    """
    params = jax.tree.map(np.asarray, params)
    out: dict[str, np.ndarray] = {}
    for e in _entries(cfg):
        leaf = _get(params, e.flax_path)
        if e.stack is not None:
            leaf = leaf[e.layer]
        out[e.ref_key] = np.ascontiguousarray(_to_flax(leaf, e.kind)).astype(dtype)
    spatial, temporal = rope_lib.rope_ranges(cfg)
    for n in range(1, N_ROPE_OPTIONS + 1):
        base = f"pos_embedder_options.n_cameras_{n}"
        out[f"{base}.seq"] = np.arange(cfg.rope_max_len, dtype=np.float32).astype(dtype)
        out[f"{base}.dim_spatial_range"] = spatial.astype(dtype)
        out[f"{base}.dim_temporal_range"] = temporal.astype(dtype)
    extras = dict(extras or {})
    for key in ACCUM_KEYS:
        default = np.float32(0) if key == "accum_train_in_hours" else np.int64(0)
        val = np.asarray(extras.get(key, default))
        out[key] = val.astype(dtype) if np.issubdtype(val.dtype, np.floating) else val.astype(np.int64)
    return out
