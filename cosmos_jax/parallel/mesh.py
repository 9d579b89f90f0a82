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
    # activations
    ("activation_batch", ("data", "fsdp")),   # samples
    ("activation_length", "context"),         # video tokens (V*T*H*W), split by context parallelism
    ("activation_embed", None),               # model width of activations
    ("activation_heads", "tensor"),
    ("activation_kv_length", None),           # text tokens (512 per view)
    ("activation_frames", None),              # per-frame conditioning (timestep embeddings, modulations)
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


def current_mesh():
    """The mesh set with `jax.set_mesh` (abstract inside jit), or None when none is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def mesh_axis_size(name: str) -> int:
    mesh = current_mesh()
    if mesh is None or name not in mesh.axis_names:
        return 1
    return mesh.shape[name]


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


def _fit_spec(spec: P, shape, mesh) -> P:
    """Drop mesh axes that do not divide a dimension (so a constraint never forces padding) or that an earlier
    dimension already uses (a weight whose two sides map to the same mesh axes shards only the first)."""
    out, used = [], set()
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        size = 1
        for a in axes_t:
            if a in mesh.axis_names and a not in used and dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                used.add(a)
                size *= mesh.shape[a]
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op when no mesh is set (single device, tests)."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return x
    spec = _fit_spec(logical_to_spec(logical_axes), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def param_shardings(boxed_params, mesh: Mesh, rules=None):
    """NamedShardings for a (boxed, logically partitioned) parameter tree, shrunk to what divides each shape."""
    rules = logical_rules() if rules is None else rules
    specs = nn.get_partition_spec(boxed_params)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_params))

    def one(spec, shape):
        mesh_spec = logical_to_spec(tuple(spec), rules) if spec is not None else P()
        return NamedSharding(mesh, _fit_spec(mesh_spec, shape, mesh))

    return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))
