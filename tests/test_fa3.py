"""The fa3 attention backend on CPU: the custom_vjp wrapper around a flash-attention kernel pair (run here with the
same kernel contract in plain XLA), its gradients, what remat policies keep of it, and backend selection.

The real FlashAttention-3 kernels only run on Hopper GPUs: bench/check_gpu_numerics.py and bench/bench_train.py
check and time them there. What can be checked without them is checked here: that the wrapper's backward equals
autodiff of plain attention, that the named kernel output and log-sum-exp let `save_attention` /
`save_self_attention` skip the forward kernel in the backward (the slowdown of a naive swap), and that choosing
the backend fails loudly where it cannot run.
"""

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.models import dit as dit_lib
from cosmos_jax.ops import attention as attn
from tools import parity

FWD_NAME = "fa3_test_forward_kernel"


def _counting_kernels():
    """xla_kernels with the forward as a jitted function of a distinctive name, so it can be counted in a jaxpr."""
    base = attn.xla_kernels()

    def fwd(q, k, v, scale):
        return base.fwd(q, k, v, scale)

    fwd.__name__ = FWD_NAME
    return attn.Kernels(fwd=jax.jit(fwd, static_argnums=3), bwd=base.bwd)


def _count_forward_kernels(jaxpr) -> int:
    """Calls of the named forward kernel in a jaxpr, sub-jaxprs (scan bodies, remat, custom_vjp, pjit) included."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.params.get("name", "") == FWD_NAME:
            n += 1
            continue
        for value in eqn.params.values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    n += _count_forward_kernels(inner)
    return n


def _plain_attention(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def test_flash_wrapper_gradients_equal_autodiff_of_plain_attention():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 3, 16)), jnp.float32) for _ in range(3))
    ct = jnp.asarray(rng.standard_normal((2, 37, 3, 16)), jnp.float32)
    kernels = attn.xla_kernels()

    def loss_flash(q, k, v):
        return jnp.sum(attn.flash_attention(q, k, v, site="self_attn", kernels=kernels) * ct)

    def loss_plain(q, k, v):
        return jnp.sum(_plain_attention(q, k, v) * ct)

    with jax.default_matmul_precision("highest"):
        got_v, got_g = jax.value_and_grad(loss_flash, argnums=(0, 1, 2))(q, k, v)
        want_v, want_g = jax.value_and_grad(loss_plain, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_remat_policies_keep_the_fa3_kernel_outputs(case_a, monkeypatch):
    """caseA's net: a base and a control stack (scanned), each block with one self- and one cross-attention.
    With `save_attention` the gradient program holds 2 forward kernels per stack fewer than with `full` (which
    reruns both in the backward); with `save_self_attention` 1 per stack fewer (cross-attention is rerun). (A naive
    FA3 swap, whose outputs no policy can name, reruns everything like `full`.)"""
    monkeypatch.setattr(attn, "fa3_kernels", _counting_kernels)
    monkeypatch.setattr(attn, "check_fa3_shape", lambda q: None)
    cfg = parity.load_case_config(str(case_a))
    params, cfg = parity.load_case_params(str(case_a), cfg)
    args = parity.load_case_inputs(str(case_a / "inputs.npz"))
    counts = {}
    for policy in ("full", "save_attention", "save_self_attention"):
        model = dit_lib.MultiViewControlDiT(dataclasses.replace(cfg, attention_backend="fa3", remat_policy=policy))

        def loss(p):
            return jnp.sum(model.apply({"params": p}, **args) ** 2)  # noqa: B023

        counts[policy] = _count_forward_kernels(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert counts["full"] - counts["save_attention"] == 4, counts
    assert counts["full"] - counts["save_self_attention"] == 2, counts


def test_remat_policies_save_the_named_fa3_tensors(monkeypatch):
    """What each policy saves of one self- and one cross-attention call on the fa3 backend."""
    monkeypatch.setattr(attn, "fa3_kernels", attn.xla_kernels)
    monkeypatch.setattr(attn, "check_fa3_shape", lambda q: None)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 2, 6, 2, 8)), jnp.float32)   # [B, T, S, H, D]
    kv = jnp.asarray(rng.standard_normal((1, 2, 5, 2, 8)), jnp.float32)  # [B, G, M, H, D]

    def block(q, kv):
        o = attn.self_attention(q, q, q, backend="fa3")
        return jnp.sin(attn.group_cross_attention(o, kv, kv, backend="fa3"))

    saved = {}
    for policy in ("save_attention", "save_self_attention", "full"):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(block, policy=dit_lib.remat_policy(policy)), q, kv)
        saved[policy] = set(re.findall(r"named '([^']+)'", text.getvalue()))
    self_names = {"self_attn_kernel_out", "self_attn_kernel_lse"}
    cross_names = {"cross_attn_kernel_out", "cross_attn_kernel_lse"}
    assert saved["save_attention"] == self_names | cross_names
    assert saved["save_self_attention"] == self_names
    assert saved["full"] == set()


def test_fa3_backend_gives_the_xla_backend_result_in_the_net(case_a, monkeypatch):
    monkeypatch.setattr(attn, "fa3_kernels", attn.xla_kernels)
    monkeypatch.setattr(attn, "check_fa3_shape", lambda q: None)
    cfg = parity.load_case_config(str(case_a))
    params, cfg = parity.load_case_params(str(case_a), cfg)
    args = parity.load_case_inputs(str(case_a / "inputs.npz"))
    want = np.load(case_a / "output.npz")["out_B_C_T_H_W"]
    model = dit_lib.MultiViewControlDiT(dataclasses.replace(cfg, attention_backend="fa3",
                                                            remat_policy="save_attention"))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(lambda p: model.apply({"params": p}, **args))(params))
    np.testing.assert_allclose(got, want, atol=5e-5 * np.abs(want).max())


class _Dev:
    def __init__(self, platform, cc="", kind="x"):
        self.platform, self.compute_capability, self.device_kind = platform, cc, kind


def test_backend_resolution(monkeypatch):
    cpu, h100, a100 = _Dev("cpu", kind="cpu"), _Dev("gpu", "9.0", "NVIDIA H100"), _Dev("gpu", "8.0", "NVIDIA A100")
    assert attn.resolve_backend("auto", [cpu]) == "xla"
    assert attn.resolve_backend("auto", [a100]) == "cudnn"
    assert attn.resolve_backend("cudnn", [h100]) == "cudnn"

    def missing():
        raise attn.AttentionBackendError("attention backend 'fa3' needs the flash-attn3-jax wheel")

    monkeypatch.setattr(attn, "fa3_kernels", missing)
    assert attn.resolve_backend("auto", [h100]) == "cudnn"  # not installed: the fallback
    with pytest.raises(attn.AttentionBackendError, match="needs the flash-attn3-jax wheel"):
        attn.resolve_backend("fa3", [h100])
    monkeypatch.setattr(attn, "fa3_kernels", attn.xla_kernels)
    assert attn.resolve_backend("auto", [h100, h100]) == "fa3"
    assert attn.resolve_backend("auto", [h100, a100]) == "cudnn"
    with pytest.raises(attn.AttentionBackendError, match=r"needs Hopper GPUs.*NVIDIA A100"):
        attn.resolve_backend("fa3", [a100])
    with pytest.raises(attn.AttentionBackendError, match="expected 'auto' or one of"):
        attn.resolve_backend("flash", [h100])


def test_fa3_refuses_shapes_the_wheel_lacks():
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(attn.AttentionBackendError, match="head_dim 64 is not built"):
        attn.flash_attention(q, q, q, site="self_attn")
    with pytest.raises(attn.AttentionBackendError, match="needs bf16/fp16"):
        attn.flash_attention(q.astype(jnp.float32), q, q, site="self_attn")
    with pytest.raises(attn.AttentionBackendError, match="unpadded"):
        attn.local_attention(q, q, q, backend="fa3", kv_len=4)
