"""Sharding audit: every logical axis name has a rule, and the 2B net is not replicated on an 8-device mesh."""

import pathlib
import re

import jax
import numpy as np
from flax import linen as nn

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
    assert {"layers", "embed", "heads", "mlp", "activation_length"} <= names


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
