"""Forward pass of the multiview control DiT on random inputs (the demo until training lands).

    python -m cosmos_jax.forward --config configs/transfer2_auto_multiview.py:tiny
    python -m cosmos_jax.forward --config configs/transfer2_auto_multiview.py:post_train_example \
        --config.model.weights=/ckpts/model_ema_bf16.pt
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app
from ml_collections import config_flags

from cosmos_jax import build
from cosmos_jax.models import dit as dit_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/transfer2_auto_multiview.py:tiny", "config file",
                                          lock_config=True)


def run(config) -> np.ndarray:
    mesh = build.mesh_from(config.mesh)
    cfg = build.dit_config_from(config.model)
    with jax.set_mesh(mesh):
        params = build.init_params(cfg, mesh, seed=config.seed, weights=config.model.weights)
        s = config.shape
        inputs = dit_lib.random_inputs(cfg, jax.random.key(config.seed + 1), batch=s.batch, n_views=s.views,
                                       height=s.height, width=s.width)
        model = dit_lib.MultiViewControlDiT(cfg)
        fwd = jax.jit(lambda p, a: model.apply({"params": p}, **a))
        t0 = time.perf_counter()
        out = jax.block_until_ready(fwd(params, inputs))
        t1 = time.perf_counter()
        out = jax.block_until_ready(fwd(params, inputs))
        t2 = time.perf_counter()
    n_params = dit_lib.count_params(params)
    print(f"{config.variant}: {n_params / 1e6:.2f} M params on mesh {dict(mesh.shape)}; "
          f"out_B_C_T_H_W {tuple(out.shape)} mean {float(out.mean()):.4f} std {float(out.std()):.4f}; "
          f"first call {t1 - t0:.2f} s (compile), second {t2 - t1:.3f} s")
    return np.asarray(out)


def main(argv):
    del argv
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
