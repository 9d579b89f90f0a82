"""Sharding audit: every logical axis name has a rule, and the 2B net is not replicated on an 8-device mesh."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from cosmos_jax.models import dit as dit_lib
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.parallel import mesh as mesh_lib

PKG = pathlib.Path(__file__).resolve().parents[1] / "cosmos_jax"


def _param_logical_names(cfg):
    boxed = jax.eval_shape(lambda: dit_lib.init_boxed_params(cfg, jax.random.key(0)))
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return boxed, {name for spec in specs for name in spec if name is not None}


def test_every_logical_name_has_a_rule():
    rules = dict(mesh_lib.DEFAULT_RULES)
    _, names = _param_logical_names(DiTConfig.tiny())
    source = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    names |= set(re.findall(r'"(activation_[a-z_]+)"', source))
    missing = sorted(n for n in names if n not in rules)
    assert not missing, f"logical axes without a sharding rule: {missing}"
    assert {"layers", "embed", "heads", "mlp", "activation_length", "activation_frame_tokens"} <= names


def test_activation_layout_is_strict_and_parameters_lenient():
    """Activations: the context axis goes to the frames T or the tokens S, and a split that does not divide is an
    error (never a silent replication). Parameters: an odd shape simply stays whole."""
    with jax.set_mesh(mesh_lib.make_mesh(fsdp=2, context=4)):
        assert mesh_lib.video_axes(8, 6, 2) == ("activation_batch", "activation_length", None)
        assert mesh_lib.video_axes(6, 16, 2) == ("activation_batch", None, "activation_frame_tokens")
        assert mesh_lib.activation_spec(mesh_lib.video_axes(6, 16, 2), (2, 6, 16)) == P(("data", "fsdp"), None,
                                                                                           "context")
        with pytest.raises(ValueError, match="'activation_length' dimension 6 is not divisible by context = 4"):
            jax.jit(lambda x: mesh_lib.constrain(x, ("activation_batch", "activation_length", None)))(
                jnp.zeros((2, 6, 16)))
        with pytest.raises(ValueError, match="mesh axis 'context' is used by both"):
            mesh_lib.activation_spec(("activation_length", "activation_frame_tokens"), (8, 8))
    mesh = mesh_lib.make_mesh(fsdp=2, context=4)
    boxed = {"w": nn.Partitioned(jnp.zeros((7, 6)), names=("embed", "embed_out"))}
    assert mesh_lib.param_shardings(boxed, mesh)["w"].spec[0] is None  # 7 rows do not split over fsdp x context


def test_2b_parameters_are_sharded_on_8_devices(tmp_path):
    cfg = DiTConfig.real_2b()
    boxed, _ = _param_logical_names(cfg)
    mesh = mesh_lib.make_mesh(fsdp=2, context=4)
    shardings = mesh_lib.param_shardings(boxed, mesh)
    leaves = jax.tree.leaves(nn.unbox(boxed))
    shard_leaves = jax.tree.leaves(shardings)
    total = replicated = 0
    lines = []
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))]
    for path, leaf, sh in zip(paths, leaves, shard_leaves):
        nbytes = int(np.prod(leaf.shape)) * 4
        total += nbytes
        if sh.is_fully_replicated:
            replicated += nbytes
        lines.append(f"{path:90s} {str(leaf.shape):22s} {sh.spec}")
    (tmp_path / "shardings.txt").write_text("\n".join(lines))  # readable dump, kept by pytest's tmp dir
    assert total / 4 > 2.0e9  # the real 2B net
    assert replicated / total < 0.01, f"{replicated / total:.1%} of parameter bytes replicated"
    per_device = sum(int(np.prod(sh.shard_shape(leaf.shape))) * 4 for leaf, sh in zip(leaves, shard_leaves))
    assert per_device < 1.05 * total / mesh.size
