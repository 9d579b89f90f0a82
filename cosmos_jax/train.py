"""Post-train the multiview control DiT: `python -m cosmos_jax.train [--config FILE:VARIANT] [--config.a.b=v ...]`.

    python -m cosmos_jax.train                                   # tiny job on the shipped sample dataset (CPU)
    python -m cosmos_jax.train --config configs/transfer2_auto_multiview.py:post_train_example \
        --config.model.weights=/ckpts/4ecc66e9-..._ema_bf16.pt --config.data.cache_dir=/data/cache

Re-running the same command resumes from the job's latest complete checkpoint
(<output_root>/<project>/<group>/<name>/checkpoints). The config keys and their meaning are in the config file
(configs/transfer2_auto_multiview.py); `--print_config` prints the resolved config and exits.
"""

from __future__ import annotations

import functools
import sys

from absl import app, flags

_DEFAULT_CONFIG = "configs/transfer2_auto_multiview.py:tiny"
_PRINT = flags.DEFINE_bool("print_config", False, "print the resolved config and exit")
_DEBUG = flags.DEFINE_bool("debug", False, "show Python tracebacks for errors")


def one_line(msg) -> str:
    """An error message on one line; of a wrapped traceback (config file errors) only its last line."""
    text = str(msg).strip()
    if "Traceback (most recent call last)" in text:
        return f"{text.splitlines()[0].split(':')[0]}: {text.splitlines()[-1]}"
    return " ".join(text.split())


def _fail(msg, code: int = 2):
    print(f"error: {one_line(msg)}", file=sys.stderr)
    sys.exit(code)


_BAD_OVERRIDE = (flags.Error, KeyError, AttributeError, TypeError, ValueError)


def parse_flags(argv):
    """absl flag parsing where a bad config override (a typo, a wrong type) is one line naming it, exit code 2."""
    try:
        return flags.FLAGS(argv)
    except _BAD_OVERRIDE as e:
        _fail(e.args[0] if isinstance(e, KeyError) and e.args else e)


def main(argv, config_flag):
    from absl import logging

    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    if not _DEBUG.value:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    config = config_flag.value
    if _PRINT.value:
        print(config)
        return 0
    from cosmos_jax.training import trainer

    try:
        summary = trainer.train(config)
    except (ValueError, RuntimeError, OSError) as e:
        if _DEBUG.value:
            raise
        _fail(e, 1)
    print(f"done: steps {summary['start_step']} -> {summary['end_step']}; job dir {summary['job_dir']}")
    return 0


def run():
    from ml_collections import config_flags

    try:  # config_flags applies --config.x=y overrides already when the flag is defined
        config_flag = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                                      "config file and variant (FILE:VARIANT)", lock_config=True)
    except _BAD_OVERRIDE as e:
        _fail(f"unknown config field {e.args[0]}" if isinstance(e, KeyError) and e.args else e)
    app.run(functools.partial(main, config_flag=config_flag), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
