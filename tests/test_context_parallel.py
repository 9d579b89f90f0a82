"""Context parallelism (Ulysses) and FSDP on 8 fake CPU devices: equal to one device, and really sharded.

The sharded runs also return the net's sown activations, whose shardings show where the context axis went (frames T
or tokens-per-frame S) and that no device holds a whole activation.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.models import blocks as blocks_lib
from cosmos_jax.models import dit as dit_lib
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.ops import attention as attn_ops
from cosmos_jax.ops import flash
from cosmos_jax.ops import fp8_attention as fp8_attn
from cosmos_jax.parallel import mesh as mesh_lib

# 8 heads so that every context size up to 8 divides them; head_dim 16 as in the fixture; 2 base blocks, 1 control
# block and 1 hint layer keep the compiles short
CFG = DiTConfig.tiny(model_channels=128, num_heads=8, num_blocks=2, hint_layers=1, dtype=jnp.float32)
BATCH = 4  # splits over data 2 x fsdp 2
# sown activations laid out as x_B_T_S_D ("blocks" carries a leading layer axis)
X_ACTIVATIONS = ("x_embedder_out_B_T_S_D", "control_embedder_out_B_T_S_D", "input_hint_block_out_B_T_S_D",
                 "final_layer_out_B_T_S_O")


@functools.lru_cache(maxsize=None)
def _params():
    """Random parameters of the net's shapes, none zero so every path matters (numpy: nothing to compile)."""
    rng = np.random.default_rng(0)

    def draw(path, x):
        n = rng.standard_normal(x.shape).astype(np.float32)
        if "scale" in jax.tree_util.keystr(path):  # RMSNorm weights
            return 1.0 + 0.05 * n
        return n / np.sqrt(x.shape[-2]) if x.ndim >= 2 else 0.05 * n

    return jax.tree_util.tree_map_with_path(draw, dit_lib.abstract_params(CFG))


@functools.lru_cache(maxsize=None)
def _inputs(h: int, w: int, views: int, batch: int = BATCH):
    make = functools.partial(dit_lib.random_inputs, CFG, batch=batch, n_views=views, height=h, width=w)
    return jax.tree.map(np.asarray, jax.jit(make)(jax.random.key(2)))


def _forward(cfg, grad: bool):
    model = dit_lib.MultiViewControlDiT(cfg)

    def f(p, a):
        out, state = model.apply({"params": p}, **a, mutable=["intermediates"])
        if not grad:
            return out, state["intermediates"]
        g = jax.grad(lambda q: jnp.mean(model.apply({"params": q}, **a) ** 2))(p)
        return out, state["intermediates"], g

    return f


def _run(mesh, h, w, views, *, grad=False, cfg=CFG):
    """(compiled HLO text, jax outputs) of the forward (+ gradients) on `mesh`, parameters FSDP-sharded."""
    f = _forward(cfg, grad)
    with jax.default_matmul_precision("highest"), jax.set_mesh(mesh):
        abstract = jax.eval_shape(lambda: dit_lib.init_boxed_params(cfg, jax.random.key(0)))
        params = jax.device_put(_params(), mesh_lib.param_shardings(abstract, mesh))
        compiled = jax.jit(f).lower(params, _inputs(h, w, views)).compile()
        return compiled.as_text(), compiled(params, _inputs(h, w, views))


@functools.lru_cache(maxsize=None)
def _reference(h, w, views):
    _, out = _run(mesh_lib.make_mesh(fsdp=1, devices=jax.devices()[:1]), h, w, views, grad=True)
    return jax.tree.map(np.asarray, out)


def _assert_sharded(inter, local_B_T_S):
    """Every x_B_T_S_D activation is split as `local_B_T_S` says, on all 8 devices (no device holds all of it)."""
    arrays = {name: inter[name][0] for name in X_ACTIVATIONS}
    arrays["blocks/out_B_T_S_D"] = inter["blocks"]["out_B_T_S_D"][0][0]  # layer 0 of the scanned stack
    for name, x in arrays.items():
        local = x.sharding.shard_shape(x.shape)
        assert local[:3] == local_B_T_S, f"{name}: {x.shape} sharded {x.sharding.spec} -> local {local}"
        assert len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated


# (h, w, views) -> T = 2 * views latent frames, S = h/2 * w/2 tokens per frame
T_SPLIT = (8, 12, 2)   # T 4, S 24
S_SPLIT = (8, 8, 3)    # T 6, S 16: context 4 does not divide T, so the tokens of each frame are split


@pytest.mark.parametrize("mesh_kw,shape,local,grad,remat", [
    (dict(fsdp=2, context=4), T_SPLIT, (2, 1, 24), True, "none"),               # frames split
    (dict(fsdp=2, context=4), S_SPLIT, (2, 6, 4), True, "save_self_attention"),  # tokens-per-frame split
    (dict(data=2, fsdp=2, context=2), T_SPLIT, (1, 2, 24), False, "none"),      # batch over data x fsdp
    (dict(fsdp=1, context=8), T_SPLIT, (4, 4, 3), False, "none"),               # context 8 > T: tokens split
], ids=["fsdp2-cp4-T", "fsdp2-cp4-S-remat", "data2-fsdp2-cp2-T", "cp8-S"])
def test_context_parallel_equals_single_device_and_shards_activations(mesh_kw, shape, local, grad, remat):
    ref = _reference(*shape)
    hlo, out = _run(mesh_lib.make_mesh(**mesh_kw), *shape, grad=grad, cfg=dataclasses.replace(CFG, remat_policy=remat))
    _assert_sharded(out[1], local)
    assert "all-to-all" in hlo  # Ulysses
    np.testing.assert_allclose(np.asarray(out[0]), ref[0], atol=1e-5, rtol=0)
    if grad:
        for a, b in zip(jax.tree.leaves(out[2]), jax.tree.leaves(ref[2])):
            np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("remat", ["save_attention", "offload_attention"])
def test_fa3_backend_under_context_parallelism_equals_single_device(monkeypatch, remat):
    """The fa3 backend (its custom_vjp, run here with the same kernel contract in plain XLA) inside the Ulysses
    shard_map, under save_attention: the policy saves the kernel's output and log-sum-exp but not the named
    `*_attn_out` after the back all-to-all, so the backward redoes that all-to-all (offload_attention: the same
    tensors, in host memory). Outputs and gradients equal the single-device xla run."""
    monkeypatch.setattr(flash, "fa3_kernels", flash.xla_kernels)
    monkeypatch.setattr(flash, "check_fa3_shape", lambda q: None)
    ref = _reference(*S_SPLIT)
    cfg = dataclasses.replace(CFG, attention_backend="fa3", remat_policy=remat)
    hlo, out = _run(mesh_lib.make_mesh(fsdp=2, context=4), *S_SPLIT, grad=True, cfg=cfg)
    assert "all-to-all" in hlo
    np.testing.assert_allclose(np.asarray(out[0]), ref[0], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(out[2]), jax.tree.leaves(ref[2])):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["fp8", "fp8_full"])
def test_fp8_backend_under_context_parallelism(monkeypatch, backend):
    """The fp8 backends (their kernels replaced by their XLA emulation) inside the Ulysses shard_map: each device
    scales its own heads from their own amax (and fp8_full its gradients from its own sampled rows), so the result
    is the single-device xla run within fp8 rounding (not bit-equal to a single-device fp8 run)."""
    monkeypatch.setattr(fp8_attn, "fp8_kernels", fp8_attn.fp8_emulation_kernels)
    monkeypatch.setattr(fp8_attn, "fp8_full_kernels", fp8_attn.fp8_full_emulation_kernels)
    monkeypatch.setattr(attn_ops, "fp8_partner", lambda: "xla")
    monkeypatch.setattr(fp8_attn, "check_fp8_shape", lambda q, k: None)
    ref = _reference(*S_SPLIT)
    cfg = dataclasses.replace(CFG, attention_backend=backend, remat_policy="save_attention")
    hlo, out = _run(mesh_lib.make_mesh(fsdp=2, context=4), *S_SPLIT, grad=True, cfg=cfg)
    assert "all-to-all" in hlo and "f8e4m3fn" in hlo

    def rel(a, b):
        return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))

    assert 1e-4 < rel(out[0], ref[0]) < 0.05
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (out[2], ref[2])]
    assert rel(*flat) < 0.1


def _trace(mesh, h, w, views, batch):
    model = dit_lib.MultiViewControlDiT(CFG)
    with jax.set_mesh(mesh):
        abstract = dit_lib.abstract_params(CFG)
        jax.eval_shape(lambda p, a: model.apply({"params": p}, **a), abstract, _inputs(h, w, views, batch))


def test_batch_not_divisible_by_batch_axes_is_an_error():
    with pytest.raises(ValueError, match=r"global batch 1 is not divisible by data x fsdp = 2; use context"):
        _trace(mesh_lib.make_mesh(fsdp=2, context=4), *T_SPLIT, batch=1)
    with pytest.raises(ValueError, match=r"global batch 2 is not divisible by data x fsdp = 4"):
        _trace(mesh_lib.make_mesh(data=2, fsdp=2, context=2), *T_SPLIT, batch=2)  # each axis alone divides 2


def test_frames_and_tokens_not_divisible_by_context_is_an_error():
    # 1 view x 2 frames of 3x5 tokens: context 4 divides neither T = 2 nor S = 15
    with pytest.raises(ValueError, match=r"neither the latent frames T = 2 .* nor the tokens per frame S = 15 .* "
                                         r"context size 4"):
        _trace(mesh_lib.make_mesh(fsdp=2, context=4), 6, 10, 1, batch=2)


# ------------------------------------------------------------------------------------------------------------------
# The attention ops
# ------------------------------------------------------------------------------------------------------------------
def _qkv(b, t, s, h=8, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, t, s, h, d)), jnp.float32) for _ in range(3)]


def _plain(q, k, v):
    b, t, s, h, d = q.shape
    flat = [z.reshape(b, t * s, h, d) for z in (q, k, v)]
    return np.asarray(attn_ops.attention(*flat, backend="xla")).reshape(q.shape)


@pytest.mark.parametrize("t,s,mesh_kw", [(6, 5, dict(fsdp=4, context=2)),          # 30 tokens, T split
                                         (3, 10, dict(fsdp=4, context=2)),         # 30 tokens, S split
                                         (4, 6, dict(data=2, fsdp=2, context=2)),  # 24 tokens, cumulative batch
                                         (3, 8, dict(fsdp=1, context=8))])         # 24 tokens, S split 8 ways
def test_ulysses_attention_op_matches_plain_attention(t, s, mesh_kw):
    q, k, v = _qkv(4, t, s)
    with jax.default_matmul_precision("highest"):
        ref = _plain(q, k, v)
        with jax.set_mesh(mesh_lib.make_mesh(**mesh_kw)):
            out = jax.jit(lambda q, k, v: attn_ops.self_attention(q, k, v, backend="xla"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def _primitives(jaxpr, into_shard_map=True) -> set[str]:
    """Names of the primitives in a jaxpr and its sub-jaxprs (jnp.pad is a nested jit, for one)."""
    names = set()
    for e in jaxpr.eqns:
        names.add(e.primitive.name)
        if e.primitive.name == "shard_map" and not into_shard_map:
            continue
        for sub in e.params.values():
            sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
            if hasattr(sub, "eqns"):
                names |= _primitives(sub, into_shard_map)
    return names


def test_ulysses_pads_only_locally(monkeypatch):
    """The cudnn path pads to a multiple of 64 inside the shard_map, after the all-to-all; the global arrays
    entering the shard_map keep their true length (30 tokens)."""
    seen = []

    def fake_cudnn(q, k, v, q_len, kv_len):  # the cuDNN contract, computed by the xla backend on CPU
        seen.append((q.shape, k.shape, q_len, kv_len))
        return attn_ops._xla_attention(q, k, v, kv_len)

    monkeypatch.setattr(attn_ops, "_cudnn_attention", fake_cudnn)
    q, k, v = _qkv(2, 3, 10)  # S split at context 2 (T = 3 is odd)
    fn = functools.partial(attn_ops.self_attention, backend="cudnn")
    with jax.default_matmul_precision("highest"), jax.set_mesh(mesh_lib.make_mesh(fsdp=2, context=2, tensor=2)):
        jaxpr = jax.make_jaxpr(fn)(q, k, v)
        out = jax.jit(fn)(q, k, v)
    (sm,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    assert [tuple(x.aval.shape) for x in sm.invars] == [q.shape] * 3
    assert "pad" not in _primitives(jaxpr.jaxpr, into_shard_map=False)
    assert {"all_to_all", "pad"} <= _primitives(sm.params["jaxpr"])
    # per device: batch 2/2, all 30 tokens, 8 heads / (2 tensor x 2 context), padded to 64 with the true length 30
    assert seen[0] == ((1, 64, 2, 16), (1, 64, 2, 16), 30, 30)
    np.testing.assert_allclose(np.asarray(out), _plain(q, k, v), atol=1e-5)


def test_group_cross_attention_matches_per_group_attention():
    q = _qkv(2, 4, 8)[0]
    k, v = _qkv(2, 2, 5, seed=1)[:2]  # 2 groups of 2 frames, 5 keys each
    ref = np.concatenate([np.asarray(attn_ops.attention(q[:, 2 * g:2 * g + 2].reshape(2, 16, 8, 16), k[:, g], v[:, g],
                                                        backend="xla")).reshape(2, 2, 8, 8, 16) for g in range(2)],
                         axis=1)
    with jax.default_matmul_precision("highest"):
        for mesh_kw in (dict(fsdp=2, context=2, tensor=2), dict(fsdp=1, context=8)):  # groups split / replicated
            fn = functools.partial(attn_ops.group_cross_attention, backend="xla")
            with jax.set_mesh(mesh_lib.make_mesh(**mesh_kw)):
                out = jax.jit(fn)(q, k, v)
                # queries stay sharded: the cuDNN call runs per device inside a shard_map
                assert "shard_map" in _primitives(jax.make_jaxpr(fn)(q, k, v).jaxpr)
            np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_ulysses_rejects_heads_not_divisible_by_context():
    q = jnp.zeros((1, 8, 2, 4, 16))
    with jax.set_mesh(mesh_lib.make_mesh(fsdp=1, context=8)):
        with pytest.raises(ValueError, match="divisible by the context axis"):
            jax.jit(lambda q: attn_ops.self_attention(q, q, q, backend="xla"))(q)


# ------------------------------------------------------------------------------------------------------------------
# Remat policies
# ------------------------------------------------------------------------------------------------------------------
class _Prim:
    name = "dot_product_attention_fwd_wrapper"  # the cuDNN forward primitive (GPU only)


def test_save_self_attention_policy_keeps_only_self_attention_cudnn_outputs():
    aval = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)
    self_qk = [aval((1, 1024, 8, 128))] * 3                      # all tokens of the sample (padded)
    cross_q, cross_kv = aval((56, 448, 8, 128)), [aval((56, 512, 8, 128))] * 2  # a frame's tokens, 512 text keys
    policy = dit_lib.remat_policy("save_self_attention")
    assert policy(_Prim(), *self_qk) and not policy(_Prim(), cross_q, *cross_kv)
    both = dit_lib.remat_policy("save_attention")
    assert both(_Prim(), *self_qk) and both(_Prim(), cross_q, *cross_kv)


def test_save_self_attention_recomputes_cross_attention(capsys):
    """Under the policy a block saves the (named) self-attention output and not the cross-attention output."""
    cfg = DiTConfig.tiny()
    t, s, d = 4, 4, cfg.model_channels
    args = (jnp.ones((1, t, s, d)), jnp.ones((1, t, d)), jnp.ones((1, t, 3 * d)),
            jnp.ones((1, 2 * cfg.crossattn_tokens_per_view, cfg.crossattn_emb_channels)),
            jnp.ones((t, s, cfg.head_dim)), jnp.zeros((t, s, cfg.head_dim)))
    block = blocks_lib.DiTBlock(cfg)
    params = jax.jit(block.init)(jax.random.key(0), *args)

    def saved(policy_name):
        f = jax.checkpoint(lambda p, *a: jnp.sum(block.apply(p, *a)), policy=dit_lib.remat_policy(policy_name))
        jax.ad_checkpoint.print_saved_residuals(f, params, *args)
        return capsys.readouterr().out

    out = saved("save_self_attention")
    assert "'self_attn_out'" in out and "cross_attn_out" not in out
    out = saved("save_attention")
    assert "'self_attn_out'" in out and "'cross_attn_out'" in out
