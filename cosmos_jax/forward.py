r"""One forward pass of the multiview control DiT on random inputs: a smoke test of the network, the mesh and a
weight file. It writes nothing; without `--config.model.weights` the weights are random too.

    python -m cosmos_jax.forward                                  # tiny network, random weights (CPU, seconds)
    python -m cosmos_jax.forward --config configs/transfer2_auto_multiview.py:post_train_example \
        --config.model.weights=/ckpts/model_ema_bf16.pt --config.shape.views=7
    python -m cosmos_jax.forward --config configs/transfer2_auto_multiview.py:tiny --print_config

The config keys and their meaning are in the config file (configs/transfer2_auto_multiview.py: its docstring and
a comment at every field); this tool reads `model`, `mesh`, `seed` and `shape` (the random input's batch, views and
latent height x width). `--print_config` prints the resolved config and exits.
"""

from __future__ import annotations

import sys
import time

from cosmos_jax import cli as cli_lib

PROG = "python -m cosmos_jax.forward"
DEFAULT_CONFIG = f"{cli_lib.CONFIG_FILE}:tiny"


def run(config):
    """The forward pass of `config` on random inputs; prints a summary and returns the output (numpy)."""
    import jax
    import numpy as np

    from cosmos_jax import build
    from cosmos_jax.models import dit as dit_lib

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
    weights = (f"weights from {config.model.weights}" if config.model.weights
               else f"RANDOM weights (seed {config.seed}; --config.model.weights=FILE loads real ones)")
    print(f"{config.variant}: {n_params / 1e6:.2f} M params, {weights}, on mesh {dict(mesh.shape)}")
    print(f"random inputs {s.batch} x {s.views} views x {s.height}x{s.width} latent -> out_B_C_T_H_W "
          f"{tuple(out.shape)} mean {float(out.mean()):.4f} std {float(out.std()):.4f}; first call "
          f"{t1 - t0:.2f} s (compile), second {t2 - t1:.3f} s")
    print("smoke test only: nothing was written (train: python -m cosmos_jax.train; generate: "
          "python -m cosmos_jax.infer)")
    return np.asarray(out)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config, _ = cli_lib.parse_config_command(argv, DEFAULT_CONFIG, doc=__doc__, prog=PROG)
    if config is None:  # --print_config
        return 0
    run(config)
    return 0


def cli() -> None:
    """The command line: errors as one line (cosmos_jax/cli.py)."""
    cli_lib.entry(main)


if __name__ == "__main__":
    cli()
