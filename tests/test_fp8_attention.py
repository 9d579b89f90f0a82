"""The fp8 attention backend on CPU: its scale arithmetic, its rounding of q, k, v and the output (run here through
the same arithmetic in plain XLA, `fp8_emulation_kernels`), what remat policies keep of it in the net, and where it
refuses to run.

cuDNN's fp8 kernel itself only runs on Hopper GPUs: bench/bench_fp8.py measures its speed and error there, and
bench/fp8_loss_curve.py compares training curves.
"""

import contextlib
import dataclasses
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.models import dit as dit_lib
from cosmos_jax.ops import attention as attn
from cosmos_jax.ops import flash
from cosmos_jax.ops import fp8_attention as fp8_attn
from tools import parity


@pytest.mark.parametrize("amax", [448.0, 447.9, 448.1, 1.0, 0.7, 3.1e-5, 2.5e6, 12.0])
@pytest.mark.parametrize("margin", [0, 2])
def test_fp8_scale_is_the_largest_power_of_two_that_fits(amax, margin):
    s = float(fp8_attn.fp8_scale(jnp.float32(amax), margin))
    e = math.log2(s)
    assert e == int(e), s  # a power of two: rescaling is exact
    limit = 448.0 / 2 ** margin
    assert amax * s <= limit * (1 + 1e-6)
    assert amax * s * 2 > limit * (1 - 1e-6)  # the next power of two would not fit


@pytest.mark.parametrize("amax", [0.0, float("inf"), float("nan")])
def test_fp8_scale_of_a_degenerate_amax_is_one(amax):
    assert float(fp8_attn.fp8_scale(jnp.float32(amax))) == 1.0


def test_fp8_quantize_saturates_instead_of_nan():
    x = jnp.asarray([1e6, -1e6, 3.0, 0.0], jnp.float32)
    got = np.asarray(fp8_attn.fp8_quantize(x, jnp.float32(1.0)).astype(jnp.float32))
    np.testing.assert_array_equal(got, [448.0, -448.0, 3.0, 0.0])


def _inputs(mag_q, mag_k, mag_v, s=128, h=2, d=16):
    rng = np.random.default_rng(0)
    q, k, v, ct = (rng.standard_normal((1, s, h, d)).astype(np.float32) for _ in range(4))
    return jnp.asarray(q * mag_q), jnp.asarray(k * mag_k), jnp.asarray(v * mag_v), jnp.asarray(ct)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("mags", [(1.0, 1.0, 1.0), (3e3, 1 / 3e3, 2e4), (1e-4, 1e4, 1e-5)])  # logits stay O(1)
def test_fp8_rounding_stays_within_e4m3_precision_at_any_magnitude(mags):
    """Per-tensor scaling keeps the e4m3 rounding of q, k, v and the output at a few percent whatever the
    magnitudes (unscaled, 2e4 saturates at 448 and 1e-5 underflows to 0); the backward is bf16/exact."""
    q, k, v, ct = _inputs(*mags)
    kernels = fp8_attn.fp8_emulation_kernels()

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * ct)

    fp8 = loss(lambda q, k, v: flash.flash_attention(q, k, v, site="self_attn", kernels=kernels))
    exact = loss(lambda q, k, v: attn.local_attention(q, k, v, backend="xla"))
    with jax.default_matmul_precision("highest"):
        o8 = flash.flash_attention(q, k, v, site="self_attn", kernels=kernels)
        o = attn.local_attention(q, k, v, backend="xla")
        g8 = jax.grad(fp8, argnums=(0, 1, 2))(q, k, v)
        g = jax.grad(exact, argnums=(0, 1, 2))(q, k, v)
    assert _rel(o8, o) < 0.08
    for a, b in zip(g8, g):
        assert _rel(a, b) < 0.1
    # the same rounding without scales is useless at these magnitudes (what the scales are for)
    if mags != (1.0, 1.0, 1.0):
        raw = [x.astype(jnp.float8_e4m3fn).astype(jnp.float32) for x in (q, k, v)]
        with jax.default_matmul_precision("highest"):
            bad = attn.local_attention(*[jnp.nan_to_num(x, posinf=448.0, neginf=-448.0) for x in raw],
                                       backend="xla")
        assert not _rel(bad, o) < 0.08


def _fp8_on_cpu(monkeypatch):
    """The fp8 backend with its kernels replaced by the XLA emulation and its bf16 partner by xla (CPU)."""
    monkeypatch.setattr(fp8_attn, "fp8_kernels", fp8_attn.fp8_emulation_kernels)
    monkeypatch.setattr(fp8_attn, "fp8_full_kernels", fp8_attn.fp8_full_emulation_kernels)
    monkeypatch.setattr(attn, "fp8_partner", lambda: "xla")
    monkeypatch.setattr(fp8_attn, "check_fp8_shape", lambda q, k: None)


def test_fp8_backend_runs_only_the_self_attention_in_fp8(monkeypatch):
    _fp8_on_cpu(monkeypatch)
    q, k, v, _ = _inputs(1.0, 1.0, 1.0)
    with jax.default_matmul_precision("highest"):
        cross = attn.local_attention(q, k, v, backend="fp8", site="cross_attn")
        self_ = attn.local_attention(q, k, v, backend="fp8", site="self_attn")
        exact = attn.local_attention(q, k, v, backend="xla")
        emulated = fp8_attn.fp8_emulation_kernels().fwd(q, k, v, 1 / math.sqrt(q.shape[-1]))[0]
    np.testing.assert_allclose(cross, exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(self_, emulated, rtol=1e-6, atol=1e-6)
    assert _rel(self_, exact) > 1e-3  # it did round through fp8


@pytest.mark.parametrize("fp8_backend", ["fp8", "fp8_full"])
def test_fp8_in_the_net_saves_the_kernel_outputs_and_trains_like_bf16(case_a, monkeypatch, fp8_backend):
    """caseA's net on the fp8 backends (emulated): `save_self_attention` saves the named kernel output and
    log-sum-exp of the self-attention, and the control branch's gradient is within fp8 rounding of xla's."""
    _fp8_on_cpu(monkeypatch)
    cfg = parity.load_case_config(str(case_a))
    params, cfg = parity.load_case_params(str(case_a), cfg)
    args = parity.load_case_inputs(str(case_a / "inputs.npz"))
    grads = {}
    for backend in ("xla", fp8_backend):
        model = dit_lib.MultiViewControlDiT(dataclasses.replace(cfg, attention_backend=backend,
                                                                remat_policy="save_self_attention"))

        def loss(p):
            return jnp.mean(model.apply({"params": p}, **args) ** 2)  # noqa: B023

        with jax.default_matmul_precision("highest"):
            grads[backend] = jax.grad(loss)(params)
        if backend != "xla":
            text = str(jax.make_jaxpr(jax.grad(loss))(params))
            assert "self_attn_kernel_out" in text and "self_attn_kernel_lse" in text
    flat = {b: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for b, g in grads.items()}
    err = _rel(flat[fp8_backend], flat["xla"])
    assert 1e-4 < err < 0.1, err


def test_fp8_refuses_where_it_cannot_run():
    q = jnp.zeros((1, 100, 2, 128), jnp.bfloat16)
    k = jnp.zeros((1, 128, 2, 128), jnp.bfloat16)
    with pytest.raises(attn.AttentionBackendError, match="multiple of 64"):
        fp8_attn.check_fp8_shape(q, k)
    with pytest.raises(attn.AttentionBackendError, match="head_dim"):
        fp8_attn.check_fp8_shape(jnp.zeros((1, 128, 2, 64), jnp.bfloat16), jnp.zeros((1, 128, 2, 64), jnp.bfloat16))
    for name in ("fp8", "fp8_full"):
        with pytest.raises(attn.AttentionBackendError, match="Hopper"):
            attn.resolve_backend(name, jax.devices("cpu"))
    with pytest.raises(attn.AttentionBackendError, match="unpadded"):
        attn.local_attention(k, k, k, backend="fp8", site="self_attn", kv_len=100)
    assert attn.compiler_options("fp8") == attn.compiler_options("fa3")


# ----------------------------------------------------------------------------------------------------------------
# fp8_full: cuDNN's fp8 backward, its scales estimated per call


def _dense_backward(do, q, k, v):
    """Everything of one exact attention backward, written out densely: (dS * scale, dq, dk, dv), o, lse, the
    softmax scale and the probabilities' amax."""
    f32 = jnp.float32
    scale = 1 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(f32) * scale
    lse = jax.nn.logsumexp(logits, axis=-1)
    p = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v)

    def loss(q, k, v):
        return jnp.sum(attn.local_attention(q, k, v, backend="xla") * do)

    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)  # autodiff of the plain op: not the code under test
    dp = jnp.einsum("bqhd,bkhd->bhqk", do, v)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * scale  # rowsum(dO o O) = sum_k P dP
    return (ds, dq, dk, dv), o, lse, scale, jnp.max(p)


@pytest.mark.parametrize("mags", [(1.0, 1.0, 1.0, 1.0), (3e3, 1 / 3e3, 2e4, 1e-4), (1e-4, 1e4, 1e-5, 1e3)])
def test_fp8_grad_amaxes_are_exact_when_every_row_is_sampled_and_a_lower_bound_otherwise(mags):
    q, k, v, ct = _inputs(*mags[:3])
    do = ct * mags[3]
    with jax.default_matmul_precision("highest"):
        grads, o, lse, scale, _ = _dense_backward(do, q, k, v)
        true = np.array([float(jnp.max(jnp.abs(g))) for g in grads])
        every = np.asarray(fp8_attn.fp8_grad_amaxes(do, q, k, v, o, lse, scale, samples=q.shape[1]))
        some = np.asarray(fp8_attn.fp8_grad_amaxes(do, q, k, v, o, lse, scale, samples=16))
    np.testing.assert_allclose(every, true, rtol=1e-4)
    assert np.all(some <= true * (1 + 1e-5)), (some, true)
    assert np.all(some >= true / 4), (some, true)  # 16 of 128 rows / columns: within the margin's headroom


@pytest.mark.parametrize("mags", [(1.0, 1.0, 1.0, 1.0), (3e3, 1 / 3e3, 2e4, 1e-9), (1e-4, 1e4, 1e-5, 1e11)])
def test_fp8_full_backward_stays_within_e4m3_precision_at_any_magnitude(mags):
    """Emulated fp8 backward (q, k, v, o, dO, probabilities, dS and dq/dk/dv through e4m3 with the chosen scales):
    gradients within ~10 % of exact whatever the magnitudes; dS itself, unscaled, would be lost to e4m3."""
    q, k, v, ct = _inputs(*mags[:3])
    do = ct * mags[3]
    kernels = fp8_attn.fp8_full_emulation_kernels()
    with jax.default_matmul_precision("highest"):
        (ds, *exact), o, lse, scale, amax_p = _dense_backward(do, q, k, v)
        got = kernels.bwd(do, q, k, v, o, lse, scale, amax_p)
        flat = jax.grad(lambda q, k, v: jnp.sum(flash.flash_attention(q, k, v, site="self_attn",
                                                                      kernels=kernels) * do),
                        argnums=(0, 1, 2))(q, k, v)  # the same backward through the custom_vjp
    for a, b in zip(got, exact):
        assert _rel(a, b) < 0.12
    for a, b in zip(flat, exact):
        assert _rel(a, b) < 0.15  # plus the forward's e4m3 output in the saved residual
    if mags[3] != 1.0:  # what the dS scale is for: plain e4m3 loses dS (|dS| ~ |v| |dO|: 2e-5 underflows, 1e6
        # saturates)
        raw = jnp.clip(ds, -448, 448).astype(jnp.float8_e4m3fn).astype(jnp.float32)
        assert _rel(raw, ds) > 0.3


def test_fp8_full_backward_binds_each_scale_where_xla_reads_it(monkeypatch):
    """The product's fp8 backward, lowered for CUDA (no GPU needed) with distinct scales: custom-call operand 6 + j
    carries FP8_BWD_SCALE_ORDER[j] (descale_* = 1 / scale), i.e. XLA's order, not the one JAX's primitive names."""
    import re

    names = ("q", "k", "v", "o", "s", "do", "dp", "dq", "dk", "dv")
    scales = {n: 2.0 ** (i + 1) for i, n in enumerate(names)}
    monkeypatch.setattr(fp8_attn, "fp8_backward_scales", lambda *a: scales)
    x = jax.ShapeDtypeStruct((1, 128, 2, 128), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((1, 2, 128), jnp.float32)
    text = jax.jit(lambda do, q, k, v, o, lse: fp8_attn._cudnn_fp8_backward(do, q, k, v, o, lse, 0.1, 0.5)).trace(
        x, x, x, x, x, lse).lower(lowering_platforms=("cuda",)).as_text()
    call = next(line for line in text.splitlines() if "fmhaSoftmaxBackwardF8" in line and "custom_call" in line)
    operands = re.search(r"custom_call @[^(]+\(([^)]*)\)", call).group(1).split(", ")
    consts = {m.group(1): float(m.group(2)) for m in re.finditer(r"(%\w+) = stablehlo.constant dense<([-\d.e+]+)>",
                                                                   text)}
    defs = {m.group(1): m.group(2)
            for m in re.finditer(r"(%\w+) = stablehlo.(?:broadcast_in_dim|reshape|convert) (%\w+)", text)}

    def value(op):
        while op not in consts:
            op = defs[op]
        return consts[op]

    want = [1 / scales[n[8:]] if n.startswith("descale_") else scales[n[6:]] for n in fp8_attn.FP8_BWD_SCALE_ORDER]
    assert [value(op) for op in operands[6:]] == want
    assert fp8_attn.FP8_BWD_SCALE_ORDER != fp8_attn.JAX_FP8_BWD_SCALE_ORDER


def test_fp8_full_refuses_an_unchecked_jax():
    fp8_attn.check_fp8_backward_jax("0.11.2")
    fp8_attn.check_fp8_backward_jax("0.10.2")
    with pytest.raises(attn.AttentionBackendError, match="0.12.0"):
        fp8_attn.check_fp8_backward_jax("0.12.0")
    assert attn.compiler_options("fp8_full") == attn.compiler_options("fa3")


def test_fp8_full_backward_reruns_when_an_estimate_let_a_gradient_saturate(monkeypatch):
    """Sampled estimates 100x too low (a missed outlier row): the first pass saturates dS and dq/dk/dv at 448, the
    kernel's measured amaxes show it, and the rerun's gradients are as good as with right estimates."""
    q, k, v, ct = _inputs(1.0, 1.0, 1.0)
    kernels = fp8_attn.fp8_full_emulation_kernels()
    with jax.default_matmul_precision("highest"):
        (_, *exact), o, lse, scale, amax_p = _dense_backward(ct, q, k, v)
        good = kernels.bwd(ct, q, k, v, o, lse, scale, amax_p)
        real = fp8_attn.fp8_grad_amaxes
        monkeypatch.setattr(fp8_attn, "fp8_grad_amaxes", lambda *a, **kw: real(*a, **kw) / 100)
        low = kernels.bwd(ct, q, k, v, o, lse, scale, amax_p)
        runs = []
        monkeypatch.setattr(fp8_attn, "fp8_backward_with_retry",
                            lambda run, sc: runs.append((*run(sc), sc)) or runs[0][0])
        saturated = kernels.bwd(ct, q, k, v, o, lse, scale, amax_p)  # the first pass alone, no retry
    _, amax, sc = runs[0]
    assert all(float(amax[n] * sc[n]) > 448 for n in fp8_attn.FP8_GRAD_NAMES)  # the measured amaxes show saturation
    for g, s_, b, e in zip(good, saturated, low, exact):
        assert _rel(g, e) < 0.12 and _rel(b, e) < 0.12
        assert _rel(s_, e) > 2 * _rel(b, e)  # what the rerun repaired


@pytest.mark.parametrize("group_elements", [None, 1])
def test_fp8_backward_scales_estimate_the_gradients_once(monkeypatch, group_elements):
    """One sampled-gradient pass per backward call: two exponentials (rows, columns), batched over all heads where
    they fit and inside one loop over head groups where they do not (a loop XLA would not merge if repeated)."""
    if group_elements is not None:  # every head its own group
        monkeypatch.setattr(fp8_attn, "FP8_GRAD_GROUP_ELEMENTS", group_elements)
    q, k, v, ct = _inputs(1.0, 1.0, 1.0)
    o, lse = flash.xla_kernels().fwd(q, k, v, 0.25)
    jaxpr = str(jax.make_jaxpr(lambda *a: fp8_attn.fp8_backward_scales(*a, 0.25, 0.5))(ct, q, k, v, o, lse))
    assert jaxpr.count(" exp ") == 2
    assert jaxpr.count("scan[") == (0 if group_elements is None else 1)


def test_fp8_grad_amaxes_head_groups_give_the_same_estimate(monkeypatch):
    q, k, v, ct = _inputs(3.0, 0.5, 2.0)
    o, lse = flash.xla_kernels().fwd(q, k, v, 0.25)
    whole = np.asarray(fp8_attn.fp8_grad_amaxes(ct, q, k, v, o, lse, 0.25, samples=16))
    monkeypatch.setattr(fp8_attn, "FP8_GRAD_GROUP_ELEMENTS", 1)
    assert fp8_attn._head_group(q.shape[0], q.shape[2], q.shape[1], 16) == 1
    looped = np.asarray(fp8_attn.fp8_grad_amaxes(ct, q, k, v, o, lse, 0.25, samples=16))
    np.testing.assert_allclose(looped, whole, rtol=1e-5)


def test_fp8_grad_amaxes_of_bf16_inputs_match_their_f32_estimate():
    """bf16 inputs stay bf16 in the estimate's products (f32 accumulation, P and dS rounded to bf16 before their
    second product): the amaxes move by far less than the scales' headroom."""
    q, k, v, ct = (x.astype(jnp.bfloat16) for x in _inputs(3.0, 0.5, 2.0))
    o, lse = flash.xla_kernels().fwd(q, k, v, 0.25)
    got = np.asarray(fp8_attn.fp8_grad_amaxes(ct, q, k, v, o, lse, 0.25, samples=16))
    with jax.default_matmul_precision("highest"):
        want = np.asarray(fp8_attn.fp8_grad_amaxes(*(x.astype(jnp.float32) for x in (ct, q, k, v, o)), lse, 0.25,
                                               samples=16))
    np.testing.assert_allclose(got, want, rtol=0.02)


def test_fp8_full_backward_scales_the_probabilities_from_the_forwards_amax():
    """The backward recomputes the probabilities normalised (~1/S where attention is spread: 5e-6 at 7 views), far
    below the forward's flash-form scale; their scale comes from the forward's amax of them (the emulated forward
    returns the true one), one power of two below 448 / amax."""
    q, k, v, ct = _inputs(2.0, 1.0, 1.0)
    with jax.default_matmul_precision("highest"):
        _, o, lse, scale, amax_p = _dense_backward(ct, q, k, v)
        fwd_amax = fp8_attn.fp8_full_emulation_kernels().fwd(q, k, v, scale)[2]
    assert abs(float(fwd_amax) / float(amax_p) - 1) < 0.1  # the forward rounds q and k through e4m3
    sc = fp8_attn.fp8_backward_scales(ct, q, k, v, o, lse, scale, jnp.float32(0.0039))
    assert float(sc["s"]) == 2.0 ** 15  # 0.0039 * 2**15 = 128 <= 448 / 2 < 0.0039 * 2**16
    assert float(fp8_attn.fp8_backward_scales(ct, q, k, v, o, lse, scale, jnp.float32(1.0))["s"]) == 128.0


def test_fp8_full_saves_the_probability_amax_with_the_kernel_outputs():
    """The remat policies that keep the kernel's output and log-sum-exp keep fp8_full's amax too (named
    `self_attn_kernel_aux`): otherwise its backward would rerun the fp8 forward to get it."""
    from cosmos_jax.models import dit as dit_lib

    q, k, v, ct = _inputs(1.0, 1.0, 1.0)
    kernels = fp8_attn.fp8_full_emulation_kernels()

    def loss(q, k, v):
        return jnp.sum(flash.flash_attention(q, k, v, site="self_attn", kernels=kernels) * ct)

    for name in ("save_attention", "save_self_attention"):
        policy = dit_lib.remat_policy(name, backend="fp8_full")
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(loss, policy=policy), q, k, v)
        names = set(re.findall(r"named '([^']+)'", text.getvalue()))
        assert {"self_attn_kernel_aux", "self_attn_kernel_lse", "self_attn_kernel_out"} <= names, (name, names)
