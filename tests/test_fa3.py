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
from cosmos_jax.ops import flash
from tools import parity

FWD_NAME = "fa3_test_forward_kernel"


def _counting_kernels():
    """xla_kernels with the forward as a jitted function of a distinctive name, so it can be counted in a jaxpr."""
    base = flash.xla_kernels()

    def fwd(q, k, v, scale):
        return base.fwd(q, k, v, scale)

    fwd.__name__ = FWD_NAME
    return flash.Kernels(fwd=jax.jit(fwd, static_argnums=3), bwd=base.bwd)


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
    kernels = flash.xla_kernels()

    def loss_flash(q, k, v):
        return jnp.sum(flash.flash_attention(q, k, v, site="self_attn", kernels=kernels) * ct)

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
    monkeypatch.setattr(flash, "fa3_kernels", _counting_kernels)
    monkeypatch.setattr(flash, "check_fa3_shape", lambda q: None)
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
    monkeypatch.setattr(flash, "fa3_kernels", flash.xla_kernels)
    monkeypatch.setattr(flash, "check_fa3_shape", lambda q: None)
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
    monkeypatch.setattr(flash, "fa3_kernels", flash.xla_kernels)
    monkeypatch.setattr(flash, "check_fa3_shape", lambda q: None)
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

    monkeypatch.setattr(flash, "fa3_kernels", missing)
    assert attn.resolve_backend("auto", [h100]) == "cudnn"  # not installed: the fallback
    with pytest.raises(attn.AttentionBackendError, match="needs the flash-attn3-jax wheel"):
        attn.resolve_backend("fa3", [h100])
    monkeypatch.setattr(flash, "fa3_kernels", flash.xla_kernels)
    assert attn.resolve_backend("auto", [h100, h100]) == "fa3"
    assert attn.resolve_backend("auto", [h100, a100]) == "cudnn"
    with pytest.raises(attn.AttentionBackendError, match=r"needs Hopper GPUs.*NVIDIA A100"):
        attn.resolve_backend("fa3", [a100])
    with pytest.raises(attn.AttentionBackendError, match="expected 'auto' or one of"):
        attn.resolve_backend("flash", [h100])


def test_fa3_refuses_shapes_the_wheel_lacks():
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(attn.AttentionBackendError, match="head_dim 64 is not built"):
        flash.flash_attention(q, q, q, site="self_attn")
    with pytest.raises(attn.AttentionBackendError, match="needs bf16/fp16"):
        flash.flash_attention(q.astype(jnp.float32), q, q, site="self_attn")
    with pytest.raises(attn.AttentionBackendError, match="unpadded"):
        attn.local_attention(q, q, q, backend="fa3", kv_len=4)


def _saved_names(fn, *args) -> set:
    """The `checkpoint_name`s of the residuals `jax.ad_checkpoint.print_saved_residuals` reports for fn(*args)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return set(re.findall(r"named '([^']+)'", text.getvalue()))


@pytest.mark.parametrize("backend", ["xla", "fa3", "cudnn"])
def test_remat_policy_saves_attention_outputs_once_per_backend(backend):
    """With a kernel backend (fa3, cudnn) the attention policies save the kernel's named output and log-sum-exp
    only, not the named `*_attn_out` (a reshape of the kernel output: saving both stored every attention output
    twice); with xla (no kernel) they save the named `*_attn_out` as well."""
    names = ("self_attn_kernel_out", "self_attn_kernel_lse", "self_attn_out",
             "cross_attn_kernel_out", "cross_attn_kernel_lse", "cross_attn_out")

    def f(x):
        # a sin/cos chain: each named value is a distinct residual the backward needs (d sin(y) = cos(y) dy)
        y = x
        for i, name in enumerate(names):
            y = jax.ad_checkpoint.checkpoint_name(jnp.sin(y) if i % 2 == 0 else jnp.cos(y), name)
        return jnp.sum(jnp.sin(y))

    x = jnp.linspace(0.1, 1.0, 8, dtype=jnp.float32)
    saved = {policy: _saved_names(jax.checkpoint(f, policy=dit_lib.remat_policy(policy, backend=backend)), x)
             for policy in ("save_attention", "save_self_attention", "save_attention_and_dots", "full")}
    self_kernel = {"self_attn_kernel_out", "self_attn_kernel_lse"}
    cross_kernel = {"cross_attn_kernel_out", "cross_attn_kernel_lse"}
    if backend == "xla":
        want_all = self_kernel | cross_kernel | {"self_attn_out", "cross_attn_out"}
        want_self = self_kernel | {"self_attn_out"}
    else:
        want_all = self_kernel | cross_kernel
        want_self = self_kernel
    assert saved["save_attention"] == want_all, saved
    assert saved["save_attention_and_dots"] == want_all, saved
    assert saved["save_self_attention"] == want_self, saved
    assert saved["full"] == set(), saved
    # all six names are residuals when every one is saveable, so the sets above are the policies' choice
    everything = jax.checkpoint_policies.save_only_these_names(*names)
    assert _saved_names(jax.checkpoint(f, policy=everything), x) == set(names)


def _scan_residual_shapes(fn, *args) -> list:
    """Shapes of the residuals `print_saved_residuals` reports as outputs of a scan (the scanned layer stacks'
    stacked per-layer residuals; it names nothing inside a scan)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return [tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"^\w+\[([\d,]*)\] output of scan", text.getvalue(), re.M)]


def _case_a_net(case_a, monkeypatch):
    monkeypatch.setattr(flash, "fa3_kernels", flash.xla_kernels)
    monkeypatch.setattr(flash, "check_fa3_shape", lambda q: None)
    cfg = parity.load_case_config(str(case_a))
    params, cfg = parity.load_case_params(str(case_a), cfg)
    args = parity.load_case_inputs(str(case_a / "inputs.npz"))

    def loss_for(backend: str, policy: str):
        model = dit_lib.MultiViewControlDiT(dataclasses.replace(cfg, attention_backend=backend, remat_policy=policy))
        return lambda p: jnp.sum(model.apply({"params": p}, **args) ** 2)

    return cfg, params, loss_for


def test_net_save_attention_keeps_each_attention_output_once(case_a, monkeypatch):
    """caseA's net (2 control + 4 base blocks, scanned; each one self- and one cross-attention) under
    `save_attention`. `print_saved_residuals` does not see the names inside nn.scan/nn.remat (it reports the
    stacks' residuals as 'output of scan'), so the saved tensors are told apart by shape: the named `*_attn_out`
    are [L, B, T, S, H, D] (6-D), the fa3 kernel outputs [L, B, N, H, D] and log-sum-exps [L, B, H, N].
    With fa3 each stack saves the 2 kernel outputs + 2 log-sum-exps and no `*_attn_out` (MultiViewControlDiT
    passes cfg.attention_backend to remat_policy); with xla it saves the 2 named `*_attn_out`."""
    cfg, params, loss_for = _case_a_net(case_a, monkeypatch)
    hd = (cfg.num_heads, cfg.head_dim)
    stacks = 2  # control and base
    shapes = {backend: _scan_residual_shapes(loss_for(backend, "save_attention"), params)
              for backend in ("fa3", "xla")}

    def attn_outs(s):  # named *_attn_out: [L, B, T, S, H, D]
        return [x for x in s if len(x) == 6 and x[-2:] == hd]

    def kernel_outs(s):  # fa3 kernel output: [L, B, N, H, D]
        return [x for x in s if len(x) == 5 and x[-2:] == hd]

    def kernel_lses(s):  # fa3 log-sum-exp: [L, B, H, N]
        return [x for x in s if len(x) == 4 and x[2] == cfg.num_heads]

    assert attn_outs(shapes["fa3"]) == [], shapes["fa3"]
    assert len(kernel_outs(shapes["fa3"])) == 2 * stacks, shapes["fa3"]
    assert len(kernel_lses(shapes["fa3"])) == 2 * stacks, shapes["fa3"]
    assert len(attn_outs(shapes["xla"])) == 2 * stacks, shapes["xla"]
    assert kernel_outs(shapes["xla"]) == [] and kernel_lses(shapes["xla"]) == [], shapes["xla"]


def test_compiler_options_per_backend():
    assert attn.compiler_options("fa3") == {"xla_gpu_enable_dynamic_slice_fusion": False}
    assert attn.compiler_options("xla") == {}
    assert attn.compiler_options("cudnn") == {}

    def f(x):
        return jnp.sum(jnp.sin(x) * x[::-1]) + jnp.cumsum(x)

    x = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32)
    want = jax.jit(f)(x)
    # XLA rejects an option name it does not know ("No such compile option"), so this compiling shows the name
    # is one XLA accepts
    got = jax.jit(f, compiler_options=attn.compiler_options("fa3"))(x)
    np.testing.assert_array_equal(got, want)
    for backend in ("xla", "cudnn"):
        np.testing.assert_array_equal(jax.jit(f, compiler_options=attn.compiler_options(backend))(x), want)


def test_fa3_backward_scratch_rows_cover_every_kernel_tile():
    """The FA3 backward kernel writes softmax_d / softmax_lse_log2 rows of the query length rounded up to its tile
    height (80 for head_dim 128 on SM90); the wheel's lowering sized them rounded to 128, so at S = 256 or 4,096 the
    kernel wrote past them (inf / wrong gradients on an H200). Our call sizes them for every tile height."""
    for sq in list(range(1, 700)) + [4000, 4096, 28_800, 57_600, 201_600]:
        rows = flash.fa3_backward_rows(sq)
        assert all(rows >= -(-sq // m) * m for m in (64, 80, 96, 128)), sq
        assert rows - sq < 128, sq
    assert flash.fa3_backward_rows(256) == 320 and flash.fa3_backward_rows(4096) == 4160


def test_fa3_backward_call_allocates_the_covering_buffers():
    """The backward FFI call (traced, not run: the kernel needs a Hopper GPU) returns gradients of the inputs'
    shapes and scratch buffers of fa3_backward_rows rows."""
    q = jnp.zeros((2, 256, 4, 128), jnp.bfloat16)
    k = jnp.zeros((2, 512, 4, 128), jnp.bfloat16)
    lse = jnp.zeros((2, 4, 256), jnp.float32)
    jaxpr = jax.make_jaxpr(flash.fa3_backward, static_argnums=6)(q, q, k, k, q, lse, 0.088)
    calls = [e for e in jaxpr.jaxpr.eqns if "ffi" in e.primitive.name]
    assert len(calls) == 1 and calls[0].params.get("target_name") == "flash_mha_bwd", calls
    shapes = [tuple(v.aval.shape) for v in calls[0].outvars]
    assert shapes == [(2, 256, 4, 128), (2, 512, 4, 128), (2, 512, 4, 128), (2, 4, 320), (2, 4, 320)]
