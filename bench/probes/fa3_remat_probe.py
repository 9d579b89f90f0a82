"""Probe: what jax.checkpoint saves around the real FA3 kernels, and how many forward kernels the compiled gradient
runs (one self- + one cross-attention call, bf16, head_dim 128)."""
import sys, os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import jax, jax.numpy as jnp
from cosmos_jax.ops import attention as attn
from cosmos_jax.models import dit as dit_lib

q = jax.random.normal(jax.random.key(0), (1, 2, 256, 2, 128), jnp.bfloat16)
kv = jax.random.normal(jax.random.key(1), (1, 2, 512, 2, 128), jnp.bfloat16)

def block(q, kv):
    o = attn.self_attention(q, q, q, backend="fa3")
    return jnp.sin(attn.group_cross_attention(o, kv, kv, backend="fa3"))

for policy in ("save_attention", "full"):
    f = jax.checkpoint(block, policy=dit_lib.remat_policy(policy))
    print("==", policy)
    jax.ad_checkpoint.print_saved_residuals(f, q, kv)
    g = jax.jit(jax.grad(lambda q, kv: jnp.sum(f(q, kv).astype(jnp.float32)), argnums=(0, 1)))
    hlo = g.lower(q, kv).compile().as_text()
    import re
    calls = re.findall(r'custom_call_target="([^"]+)"', hlo)
    print("custom calls:", sorted(calls))
