"""Activation rematerialisation changes memory, never the numbers: gradients under every remat policy equal those
without rematerialisation (caseA's network, weights and inputs; fp32, full-precision matmuls)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.models import dit as dit_lib
from cosmos_jax.models.dit_config import REMAT_POLICIES
from tools import parity

REL_TOL = 1e-5  # observed ~1e-6 (XLA fuses the recomputed forward differently)


def test_gradients_under_every_remat_policy_equal_no_remat(case_a):
    cfg = parity.load_case_config(str(case_a))
    params, cfg = parity.load_case_params(str(case_a), cfg)
    args = parity.load_case_inputs(str(case_a / "inputs.npz"))
    out_shape = np.load(case_a / "output.npz")["out_B_C_T_H_W"].shape
    cotangent = np.random.default_rng(0).standard_normal(out_shape).astype(np.float32)
    assert REMAT_POLICIES[0] == "none" and len(REMAT_POLICIES) >= 6

    models = {p: dit_lib.MultiViewControlDiT(dataclasses.replace(cfg, remat_policy=p)) for p in REMAT_POLICIES}
    for policy, model in models.items():  # the policy really wraps both scanned stacks (control and base blocks)
        jaxpr = str(jax.make_jaxpr(lambda p, a: model.apply({"params": p}, **a))(params, args))  # noqa: B023
        assert jaxpr.count("remat") == (0 if policy == "none" else 2), policy

    def all_grads(p, a, ct):  # <out, ct>: every output element weighs on the gradient; one program, all policies
        return {policy: jax.value_and_grad(lambda q: jnp.sum(model.apply({"params": q}, **a) * ct))(p)
                for policy, model in models.items()}

    with jax.default_matmul_precision("highest"):
        results = jax.tree.map(np.asarray, jax.jit(all_grads)(params, args, cotangent))

    ref_value, ref_grads = results["none"]
    ref_leaves = jax.tree_util.tree_leaves_with_path(ref_grads)
    assert len(ref_leaves) > 60  # every parameter of the net (scanned blocks stacked)
    failures = []
    for policy in REMAT_POLICIES[1:]:
        value, grads = results[policy]
        if abs(value - ref_value) > REL_TOL * abs(ref_value):
            failures.append(f"{policy}: loss {value} vs {ref_value}")
        for (path, want), got in zip(ref_leaves, jax.tree.leaves(grads), strict=True):
            scale = np.max(np.abs(want))
            assert scale > 0, f"{jax.tree_util.keystr(path)}: zero gradient, the comparison would be vacuous"
            err = np.max(np.abs(got - want))
            if err > REL_TOL * scale:
                failures.append(f"{policy} {jax.tree_util.keystr(path)}: max |diff| {err:.3g}, max |grad| {scale:.3g}")
    assert not failures, "\n".join(failures)


def test_offload_attention_moves_the_saved_attention_outputs_to_host_memory(case_a):
    """offload_attention (gradients checked above with the rest) copies the named attention outputs to host memory
    in the forward and back in the backward; save_attention keeps them on the device; cuDNN's unnamed saved outputs
    cannot be offloaded, which is an error rather than a silent recompute."""
    import re

    import pytest

    cfg = parity.load_case_config(str(case_a))
    params, cfg = parity.load_case_params(str(case_a), cfg)
    args = parity.load_case_inputs(str(case_a / "inputs.npz"))
    to_host = {}
    for policy in ("save_attention", "offload_attention"):
        model = dit_lib.MultiViewControlDiT(dataclasses.replace(cfg, remat_policy=policy))
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, **args))))(params))  # noqa: B023
        to_host[policy] = len(re.findall(r"device_put\[[^\]]*devices=\(MemorySpace\.Host,\)", jaxpr))
    assert to_host["save_attention"] == 0
    assert to_host["offload_attention"] >= 4  # self- and cross-attention outputs of both scanned stacks
    with pytest.raises(ValueError, match="offload_attention.*cuDNN"):
        dit_lib.remat_policy("offload_attention", backend="cudnn")
