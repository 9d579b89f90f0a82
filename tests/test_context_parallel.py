"""Ulysses context parallelism (and FSDP parameter sharding) on 8 fake CPU devices equals one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cosmos_jax.models import dit as dit_lib
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.ops import attention as attn_ops
from cosmos_jax.parallel import mesh as mesh_lib

# 8 heads so that every context size up to 8 divides them; head_dim 16 as in the fixture
CFG = DiTConfig.tiny(model_channels=128, num_heads=8, dtype=jnp.float32)


@functools.lru_cache(maxsize=None)
def _params_and_inputs(h: int, w: int, views: int):
    params = nn.unbox(dit_lib.init_boxed_params(CFG, jax.random.key(0)))
    # the zero-initialised tensors (adaLN up, control projections) are made non-zero so every path matters
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    inputs = dit_lib.random_inputs(CFG, jax.random.key(2), batch=2, n_views=views, height=h, width=w)
    return params, inputs


def _run(mesh, params, inputs, grad=False):
    model = dit_lib.MultiViewControlDiT(CFG)

    def f(p, a):
        out = model.apply({"params": p}, **a)
        return (out, jax.grad(lambda q: jnp.mean(model.apply({"params": q}, **a) ** 2))(p)) if grad else out

    with jax.default_matmul_precision("highest"), jax.set_mesh(mesh):
        abstract = jax.eval_shape(lambda: dit_lib.init_boxed_params(CFG, jax.random.key(0)))
        shardings = mesh_lib.param_shardings(abstract, mesh)
        params = jax.device_put(params, shardings)
        return jax.tree.map(np.asarray, jax.jit(f)(params, inputs))


@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("h,w,views", [(8, 12, 2),   # 2*2*4*6 = 96 tokens/sample: splits evenly
                                       (6, 10, 1)])  # 2*3*5 = 30 tokens: padded to a multiple of cp
def test_context_parallel_equals_single_device(cp, h, w, views):
    params, inputs = _params_and_inputs(h, w, views)
    ref = _run(mesh_lib.make_mesh(fsdp=1, devices=jax.devices()[:1]), params, inputs)
    out = _run(mesh_lib.make_mesh(fsdp=-1, context=cp), params, inputs)
    assert np.max(np.abs(out - ref)) <= 1e-5


def test_context_parallel_gradients_equal_single_device():
    params, inputs = _params_and_inputs(8, 12, 2)
    ref_out, ref_g = _run(mesh_lib.make_mesh(fsdp=1, devices=jax.devices()[:1]), params, inputs, grad=True)
    out, g = _run(mesh_lib.make_mesh(data=2, fsdp=1, context=4), params, inputs, grad=True)
    assert np.max(np.abs(out - ref_out)) <= 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_ulysses_attention_op_matches_plain_attention():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 8, 16)), jnp.float32) for _ in range(3))
    with jax.default_matmul_precision("highest"):
        ref = attn_ops.attention(q, k, v, backend="xla")
        with jax.set_mesh(mesh_lib.make_mesh(fsdp=2, context=4)):
            out = jax.jit(lambda q, k, v: attn_ops.self_attention(q, k, v, backend="xla"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_ulysses_rejects_heads_not_divisible_by_context():
    q = jnp.zeros((1, 16, 4, 16))
    with jax.set_mesh(mesh_lib.make_mesh(fsdp=1, context=8)):
        with pytest.raises(ValueError, match="divisible by the context axis"):
            jax.jit(lambda q: attn_ops.self_attention(q, q, q, backend="xla"))(q)
