r"""Post-train the multiview control DiT: `python -m cosmos_jax.train [--config FILE:VARIANT] [--config.a.b=v ...]`.

    python -m cosmos_jax.train                                   # tiny job on the shipped sample dataset (CPU)
    python -m cosmos_jax.train --config configs/transfer2_auto_multiview.py:post_train_example \
        --config.model.weights=/ckpts/4ecc66e9-..._ema_bf16.pt --config.data.cache_dir=/data/cache
    python -m cosmos_jax.train --config configs/transfer2_auto_multiview.py:post_train_example --print_config

Re-running the same command resumes from the job's latest complete checkpoint
(<output_root>/<project>/<group>/<name>/checkpoints). The config keys and their meaning are in the config file
(configs/transfer2_auto_multiview.py: its docstring and a comment at every field); `--print_config` prints the
resolved config (with the overrides applied) and exits. A bad dataset, missing weights or a config typo stop the
run before it starts with one line naming the file or field (`--debug` shows the traceback).
"""

from __future__ import annotations

import sys

from cosmos_jax import cli as cli_lib

PROG = "python -m cosmos_jax.train"
DEFAULT_CONFIG = f"{cli_lib.CONFIG_FILE}:tiny"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config, debug = cli_lib.parse_config_command(argv, DEFAULT_CONFIG, doc=__doc__, prog=PROG,
                                                 debug_help=cli_lib.DEBUG_HELP + "; also keeps the INFO logs of Orbax")
    if config is None:  # --print_config
        return 0
    from absl import logging

    if not debug:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    from cosmos_jax.training import trainer

    cli_lib.enable_compilation_cache(config)
    summary = trainer.train(config)
    print(f"done: steps {summary['start_step']} -> {summary['end_step']}; job dir {summary['job_dir']}")
    return 0


def cli() -> None:
    """The command line (also the console script of pyproject.toml): errors as one line (cosmos_jax/cli.py)."""
    cli_lib.entry(main)


if __name__ == "__main__":
    cli()
