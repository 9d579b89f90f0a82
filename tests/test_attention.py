"""The attention op's padded-sequence handling, on CPU.

The cudnn backend pads q, k, v to a multiple of 64 tokens and passes the true lengths as `query_seq_lengths` /
`key_value_seq_lengths`; the xla backend masks padded keys through `kv_len`. Both must give, for the valid
positions, the outputs and gradients of the unpadded attention, here checked against a float64 numpy softmax
attention. The cudnn backend's own code (padding, lengths, slicing) runs with `jax.nn.dot_product_attention`'s XLA
implementation standing in for the cuDNN kernel, which CPUs lack.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.ops import attention as attn_ops

B, SQ, SKV, H, D = 2, 37, 45, 3, 16  # odd lengths: padded to 64 by the cudnn backend


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(np.float32) for s in ((B, SQ, H, D), (B, SKV, H, D), (B, SKV, H, D)))


def _reference(q, k, v, ct=None):
    """softmax(q k^T / sqrt(D)) v in float64, [B, Sq, H, D]; with a cotangent `ct` also the gradients of
    sum(out * ct) with respect to q, k, v (the textbook backward of softmax attention)."""
    q, k, v = (np.asarray(z, np.float64) for z in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    if ct is None:
        return out
    dv = np.einsum("bhqk,bqhd->bkhd", p, ct)
    dp = np.einsum("bqhd,bkhd->bhqk", ct, v)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True)) * scale
    return out, (np.einsum("bhqk,bkhd->bqhd", ds, k), np.einsum("bhqk,bqhd->bkhd", ds, q), dv)


def _pad(x, n, fill):
    """x padded along the sequence with `fill` (not zeros: padding must be excluded, not merely harmless)."""
    return np.concatenate([x, np.full((x.shape[0], n - x.shape[1]) + x.shape[2:], fill, x.dtype)], axis=1)


def test_xla_masked_padding_equals_unpadded_outputs_and_gradients():
    q, k, v = _qkv()
    ct = np.random.default_rng(1).standard_normal((B, SQ, H, D)).astype(np.float32)
    qp, kp, vp = _pad(q, 64, 3.0), _pad(k, 64, 3.0), _pad(v, 64, 5.0)

    def padded_loss(qp, kp, vp):
        out = attn_ops.local_attention(qp, kp, vp, backend="xla", q_len=SQ, kv_len=SKV)
        return jnp.sum(out[:, :SQ] * ct), out

    def plain_loss(q, k, v):
        out = attn_ops.local_attention(q, k, v, backend="xla")
        return jnp.sum(out * ct), out

    @jax.jit
    def run(q, k, v, qp, kp, vp):
        (_, out_p), g_p = jax.value_and_grad(padded_loss, argnums=(0, 1, 2), has_aux=True)(qp, kp, vp)
        (_, out), g = jax.value_and_grad(plain_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        unmasked = attn_ops.local_attention(qp, kp, vp, backend="xla")  # the padded keys attended to
        return out_p, g_p, out, g, unmasked

    with jax.default_matmul_precision("highest"):
        out_p, g_p, out, g, unmasked = jax.tree.map(np.asarray, run(q, k, v, qp, kp, vp))
    want = _reference(q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(out_p[:, :SQ], want, atol=1e-5)
    assert np.max(np.abs(unmasked[:, :SQ] - want)) > 0.1  # without the mask the padding would change the result
    _, g_want = _reference(q, k, v, ct)
    for name, a, b, w, n in zip("qkv", g_p, g, g_want, (SQ, SKV, SKV)):
        np.testing.assert_allclose(b, w, atol=1e-4, err_msg=f"d{name}")
        np.testing.assert_allclose(a[:, :n], w, atol=1e-4, err_msg=f"d{name} (padded)")
        assert np.all(a[:, n:] == 0), f"d{name}: gradient reaches the padding"


def test_reference_gradient_is_the_finite_difference():
    """The float64 reference backward used above, against central differences of its forward."""
    q, k, v = (z.astype(np.float64) for z in _qkv(4))
    ct = np.random.default_rng(5).standard_normal((B, SQ, H, D))
    _, grads = _reference(q, k, v, ct)
    eps = 1e-6
    for which, idx in ((0, (0, 0, 0, 0)), (0, (1, SQ - 1, 2, D - 1)), (1, (1, 17, 1, 5)), (2, (0, SKV - 1, 2, 3))):
        plus, minus = [z.copy() for z in (q, k, v)], [z.copy() for z in (q, k, v)]
        plus[which][idx] += eps
        minus[which][idx] -= eps
        fd = (np.sum(_reference(*plus) * ct) - np.sum(_reference(*minus) * ct)) / (2 * eps)
        assert abs(grads[which][idx] - fd) <= 1e-6 * max(1.0, abs(fd)), (which, idx, grads[which][idx], fd)


def test_cudnn_backend_padding_and_lengths_on_the_xla_kernel(monkeypatch):
    real = jax.nn.dot_product_attention
    calls = []

    def xla_kernel(q, k, v, *, query_seq_lengths=None, key_value_seq_lengths=None, implementation=None, **kw):
        assert implementation == "cudnn"
        calls.append((q.shape, k.shape, query_seq_lengths, key_value_seq_lengths))
        return real(q, k, v, query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                    implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_kernel)
    q, k, v = _qkv(2)
    ct = np.random.default_rng(3).standard_normal((B, SQ, H, D)).astype(np.float32)
    bf = [jnp.asarray(z, jnp.bfloat16) for z in (q, k, v)]

    @jax.jit
    def run(q, k, v):
        def loss(q, k, v):
            out = attn_ops.local_attention(q, k, v, backend="cudnn")
            return jnp.sum(out.astype(jnp.float32) * ct), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads, calls[-1][2:]  # the lengths the kernel was given (traced values: returned)

    out, grads, (q_lens, kv_lens) = run(*bf)
    # what the backend handed to the kernel: sequences padded to 64, the true lengths per batch entry
    assert len(calls) == 1
    (q_shape, k_shape, _, _), = calls
    assert q_shape == (B, 64, H, D) and k_shape == (B, 64, H, D)
    assert list(q_lens) == [SQ] * B and list(kv_lens) == [SKV] * B
    assert out.shape == (B, SQ, H, D) and out.dtype == jnp.bfloat16
    # the valid positions equal the unpadded attention (of the bf16-rounded inputs), to bf16 accuracy
    qr, kr, vr = (np.asarray(z, np.float32) for z in bf)
    want, g_ref = _reference(qr, kr, vr, ct)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2)
    for name, a, b in zip("qkv", grads, g_ref):
        a = np.asarray(a, np.float32)
        assert a.shape == b.shape and np.all(np.isfinite(a)), f"d{name}"
        assert np.max(np.abs(a - b)) <= 3e-2 * np.max(np.abs(b)), f"d{name}: {np.max(np.abs(a - b))}"


def test_cudnn_backend_refuses_what_cudnn_cannot_run():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="bf16/fp16"):
        attn_ops.local_attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn_ops.local_attention(q, k, v, backend="flash")
