"""Device mesh, logical-axis rules and sharding helpers (maxtext style).

Model code names tensor axes logically ("activation_length", "embed", ...); one table maps those names to mesh
axes. The table lives here (the config selects it) so one place says how the model is laid out over devices.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical name -> mesh axes (None = replicated). Every logical name used in model code must be listed
# (tests/test_sharding.py checks this), so no axis is replicated by omission.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    # activations. Activation constraints are strict (`constrain`): a mesh axis that does not divide its dimension
    # is an error, never a silent replication.
    ("activation_batch", ("data", "fsdp")),   # samples (the global batch must divide data x fsdp)
    # x_B_T_S_D: context parallelism splits the latent frames T (all views, view-major) when the context size
    # divides T, else the tokens S of every frame (the reference: "spatial split when cp > state_t or
    # state_t % cp != 0"). `video_axes` picks one of the two names; both map to the context axis.
    ("activation_length", "context"),         # latent frames T
    ("activation_frame_tokens", "context"),   # tokens S = H*W of one latent frame
    ("activation_embed", None),               # model width of activations
    ("activation_heads", "tensor"),           # attention heads (q, k, v inside the attention op)
    ("activation_frames", None),              # per-frame conditioning (timestep embeddings, adaLN modulations)
    # parameters: FSDP over fsdp x context (the reference FSDP-shards the net over its CP group too)
    ("layers", None),                         # stacked-block axis of scanned parameters
    ("embed", ("fsdp", "context")),           # model width D on the input side of a weight
    ("embed_out", "tensor"),                  # model width D on the output side of a D x D weight
    ("mlp", "tensor"),                        # MLP hidden 4D
    ("heads", "tensor"),                      # attention inner dim (heads * head_dim)
    ("kv_embed", ("fsdp", "context")),        # cross-attention context width
    ("modulation", ("fsdp", "context")),      # adaLN 3D / 2D outputs
    ("lora", None),                           # adaLN-LoRA rank
    ("patch_in", None),                       # patchified input channels
    ("patch_out", None),                      # final layer output channels
    ("text_in", ("fsdp", "context")),         # crossattn_proj input (100352 in the 2B model)
    ("norm", None),                           # RMSNorm scales, biases
    ("views", None),                          # view embedding table
    ("vocab", ("fsdp", "context")),           # text-encoder token embedding rows (152064 in Qwen2.5-VL-7B)
)

_RULES: contextvars.ContextVar = contextvars.ContextVar("cosmos_jax_rules", default=DEFAULT_RULES)


def logical_rules():
    return _RULES.get()


@contextlib.contextmanager
def use_rules(rules):
    token = _RULES.set(tuple(rules))
    try:
        with nn.logical_axis_rules(rules):
            yield
    finally:
        _RULES.reset(token)


def make_mesh(data: int = 1, fsdp: int = -1, context: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data','fsdp','context','tensor') mesh; one size may be -1 (fill with the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, context, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices not divisible by the fixed mesh axes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


_UNSHARDED: contextvars.ContextVar = contextvars.ContextVar("cosmos_jax_unsharded", default=False)


@contextlib.contextmanager
def unsharded_activations():
    """Trace model code as on one device even under `jax.set_mesh`: no activation constraints, local attention.
    For parameter initialisation, whose dummy inputs need not split over the mesh (parameters are placed by
    `param_shardings`, not by what the trace did)."""
    token = _UNSHARDED.set(True)
    try:
        yield
    finally:
        _UNSHARDED.reset(token)


def current_mesh():
    """The mesh set with `jax.set_mesh` (abstract inside jit), or None when none is set (or inside
    `unsharded_activations`)."""
    if _UNSHARDED.get():
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def logical_to_spec(logical_axes: Sequence[str | None], rules=None) -> P:
    rules = dict(logical_rules() if rules is None else rules)
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in the sharding table (parallel/mesh.py)")
        spec.append(rules[name])
    return P(*spec)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_mesh_axes(name: str) -> tuple[str, ...]:
    """The axes of the current mesh that logical axis `name` maps to (() without a mesh, or when replicated)."""
    mesh = current_mesh()
    if mesh is None:
        return ()
    return tuple(a for a in _as_tuple(logical_to_spec((name,))[0]) if a in mesh.axis_names)


def logical_axis_size(name: str) -> int:
    """How many ways logical axis `name` is split on the current mesh (1 without a mesh)."""
    mesh = current_mesh()
    return int(np.prod([mesh.shape[a] for a in logical_mesh_axes(name)])) if mesh is not None else 1


def video_axes(t: int, s: int, b: int | None = None) -> tuple[str | None, str | None, str | None]:
    """Logical names of the (batch, frames T, tokens-per-frame S) axes of a video activation under the current mesh.

    Context parallelism shards T when the context size divides it, else S (the reference splits space "when
    cp > state_t or state_t % cp != 0"). Raises when neither divides, or when the batch `b` (if given) does not
    split over the batch mesh axes, instead of silently replicating the activation on every device.
    """
    if b is not None:
        n_batch = logical_axis_size("activation_batch")
        if b % n_batch:
            names = " x ".join(logical_mesh_axes("activation_batch"))
            raise ValueError(f"global batch {b} is not divisible by {names} = {n_batch}; use context parallelism "
                             "(mesh.context) for single-sample steps")
    cp_t, cp_s = logical_axis_size("activation_length"), logical_axis_size("activation_frame_tokens")
    if t % cp_t == 0:
        return "activation_batch", "activation_length", None
    if s % cp_s == 0:
        return "activation_batch", None, "activation_frame_tokens"
    size = str(cp_t) if cp_t == cp_s else f"{cp_t} (frames) / {cp_s} (tokens)"
    raise ValueError(f"context parallelism: neither the latent frames T = {t} (all views) nor the tokens per frame "
                     f"S = {s} are divisible by the context size {size}; choose another mesh.context or resolution")


def activation_spec(logical_axes: Sequence[str | None], shape) -> P:
    """Mesh PartitionSpec of an activation, strict: every mesh axis a name maps to must divide its dimension and
    may appear once (an error otherwise; never dropped, which would replicate the activation and its compute)."""
    mesh = current_mesh()
    out, used = [], {}
    for dim, name in zip(shape, tuple(logical_axes) + (None,) * (len(shape) - len(logical_axes))):
        axes = logical_mesh_axes(name) if name is not None else ()
        for a in axes:
            if a in used:
                raise ValueError(f"activation of shape {tuple(shape)}: mesh axis {a!r} is used by both "
                                 f"{used[a]!r} and {name!r} ({tuple(logical_axes)})")
            used[a] = name
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if dim % size:
            raise ValueError(f"activation of shape {tuple(shape)}: its {name!r} dimension {dim} is not divisible by "
                             f"{' x '.join(axes)} = {size} ({tuple(logical_axes)})")
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names (strict, see `activation_spec`); a no-op when no mesh with more
    than one device is set (single device, tests)."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(logical_axes, x.shape))


def _fit_param_spec(spec: P, shape, mesh) -> P:
    """Parameters only: drop mesh axes that do not divide a dimension (odd parameter shapes, e.g. a 7-row view
    table, legitimately cannot split) or that an earlier dimension already uses (a weight whose two sides map to the
    same mesh axes shards only the first). tests/test_sharding.py bounds the replicated bytes this allows."""
    out, used = [], set()
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        kept = []
        size = 1
        for a in _as_tuple(axes):
            if a in mesh.axis_names and a not in used and dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                used.add(a)
                size *= mesh.shape[a]
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out)


def param_shardings(boxed_params, mesh: Mesh, rules=None):
    """NamedShardings for a (boxed, logically partitioned) parameter tree, shrunk to what divides each shape."""
    rules = logical_rules() if rules is None else rules
    specs = nn.get_partition_spec(boxed_params)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_params))

    def one(spec, shape):
        mesh_spec = logical_to_spec(tuple(spec), rules) if spec is not None else P()
        return NamedSharding(mesh, _fit_param_spec(mesh_spec, shape, mesh))

    return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))
