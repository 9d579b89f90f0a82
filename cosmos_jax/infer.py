r"""Multiview inference: `python -m cosmos_jax.infer --spec SPEC.json|.jsonl -o OUT_DIR --checkpoint_path CKPT`.

    python -m cosmos_jax.infer --spec assets/multiview_example/multiview_spec.json -o outputs/example \
        --checkpoint_path /ckpts/model_ema_bf16.pt --config.text.model_dir=/ckpts/Cosmos-Reason1-7B \
        --config.vae.weights=/ckpts/tokenizer.pth
    python -m cosmos_jax.infer --config configs/transfer2_auto_multiview.py:tiny --num_steps=2 \
        --spec assets/multiview_example/multiview_spec.json -o /tmp/tiny_infer \
        --checkpoint_path /tmp/cosmos_jax-output/cosmos_transfer_v2p5/auto_multiview/tiny/checkpoints
    # the reference's / the post-training guide's forms work as they are:
    python -m cosmos_jax.infer -i SPEC.json -o OUT --checkpoint_path CKPT \
        --experiment transfer2_auto_multiview_post_train_example
    python -m cosmos_jax.infer --params_file SPEC.json --num_gpus=8 --checkpoint_path CKPT \
        --experiment transfer2_auto_multiview_post_train_example -o OUT

The spec format is the reference's (cosmos_jax/inference/spec.py lists every field); `--<field>=v` overrides a
top-level field of every sample (seed, guidance, num_steps, fps, control_weight, num_conditional_frames, prompt,
prompt_path, negative_prompt, enable_autoregressive, num_chunks, chunk_overlap, save_combined_views).
CKPT: a reference/exported `.pt` (its `net.*` weights, as the reference loads them: model_ema_*.pt and the released
*_ema_bf16.pt are EMA), a reference DCP checkpoint, or an Orbax checkpoint directory of `python -m cosmos_jax.train`
(a job's checkpoints/ dir = its latest step); directories give their EMA weights unless --noema.
The run config (model, VAE, text encoder, resolution data.height x data.width, mesh) defaults to post_train_example;
`--config FILE:VARIANT`, `--experiment NAME` and `--config.x=y` choose another. `--num_gpus=N` uses the first N
devices (= --config.mesh.num_devices=N), `--context_parallel_size=N` sets --config.mesh.context=N. The config
keys and their meaning are in the config file (configs/transfer2_auto_multiview.py: its docstring and a comment at
every field); `--print_config` prints the resolved run config and exits.
Outputs in OUT_DIR: <name>.mp4 (or <name>_<view>.mp4 + <name>_grid.mp4), <name>.json, config.json.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags

from cosmos_jax import cli as cli_lib

PROG = "python -m cosmos_jax.infer"
CONFIG_FILE = cli_lib.CONFIG_FILE
DEFAULT_VARIANT = "post_train_example"
# flags of the reference's setup arguments that have no meaning here (no guardrails, ...): accepted, ignored
_IGNORED_BOOL = ("disable_guardrails", "offload_guardrail_models", "keep_going")


class CliError(cli_lib.UsageError):
    """A bad command line; one line naming the flag."""


@dataclasses.dataclass
class InferArgs:
    specs: list[str]
    output_dir: str
    checkpoint_path: str
    config: object          # ml_collections.ConfigDict
    overrides: dict
    ema: bool = True
    debug: bool = False
    print_config: bool = False

    def comparable(self) -> dict:
        """Everything, with the config as a plain dict (tests compare command-line forms)."""
        return {**dataclasses.asdict(dataclasses.replace(self, config=None)), "config": self.config.to_dict()}


def normalize_argv(argv: list[str]) -> list[str]:
    """Map the reference's and the post-training guide's command forms onto ours: `-i A B ...` / `--input_files`
    / `--params_file` -> `--spec` each, `--experiment NAME` -> `--config=FILE:NAME`, `--num_gpus=N` ->
    `--config.mesh.num_devices=N`, `--context_parallel_size=N` -> `--config.mesh.context=N`, `--a-b` -> `--a_b`.
    The `--config=` value comes first (config overrides must follow it)."""
    prog, rest = argv[0], list(argv[1:])
    out: list[str] = []
    config = experiment = None
    i = 0

    def value_of(arg: str) -> tuple[str, int]:
        if "=" in arg:
            return arg.split("=", 1)[1], 1
        if i + 1 >= len(rest):
            raise CliError(f"{arg} needs a value")
        return rest[i + 1], 2

    while i < len(rest):
        arg = rest[i]
        if arg.startswith("--") and not arg.startswith("--config."):
            name, eq, val = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + val
        name = arg.split("=", 1)[0]
        if name in ("-i", "--input_files"):
            files = [arg.split("=", 1)[1]] if "=" in arg else []
            i += 1
            while i < len(rest) and not rest[i].startswith("-"):
                files.append(rest[i])
                i += 1
            if not files:
                raise CliError(f"{name} needs at least one spec file")
            out += [f"--spec={f}" for f in files]
            continue
        if name in ("--params_file", "--experiment", "--num_gpus", "--context_parallel_size", "--config"):
            val, n = value_of(arg)
            i += n
            if name == "--params_file":
                out.append(f"--spec={val}")
            elif name == "--experiment":
                experiment = val
            elif name == "--num_gpus":
                out.append(f"--config.mesh.num_devices={val}")
            elif name == "--context_parallel_size":
                out.append(f"--config.mesh.context={val}")
            else:
                config = val
            continue
        out.append(arg)
        i += 1
    if experiment is not None:
        variant = _config_aliases().get(experiment, experiment)
        if config is not None and config.rpartition(":")[2] not in (variant, experiment):
            raise CliError(f"--experiment={experiment} and --config={config} choose different configs")
        config = config or f"{CONFIG_FILE}:{experiment}"
    config = config or f"{CONFIG_FILE}:{DEFAULT_VARIANT}"
    return [prog, f"--config={config}"] + out


def _config_aliases() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cosmos_jax_run_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.ALIASES)


def _define(fv: flags.FlagValues, argv: list[str]):
    from cosmos_jax.inference import spec as spec_lib

    h = {}
    h["spec"] = flags.DEFINE_multi_string("spec", [], "spec file(s): .json (one sample) or .jsonl (one per line); "
                                          "repeatable (also -i A B ..., --input_files, --params_file)",
                                          flag_values=fv)
    h["output_dir"] = flags.DEFINE_string("output_dir", None, "output directory (created if missing)", short_name="o",
                                          flag_values=fv)
    h["checkpoint_path"] = flags.DEFINE_string("checkpoint_path", None, "weights: .pt file, DCP or Orbax checkpoint "
                                               "(default: config.model.weights)", flag_values=fv)
    h["ema"] = flags.DEFINE_bool("ema", True, "checkpoint directories: load the EMA weights (--noema: regular)",
                                 flag_values=fv)
    h["print_config"] = flags.DEFINE_bool("print_config", False, "print the resolved run config (overrides applied) "
                                          "and exit", flag_values=fv)
    h["debug"] = flags.DEFINE_bool("debug", False, cli_lib.DEBUG_HELP, flag_values=fv)
    for name in _IGNORED_BOOL:
        flags.DEFINE_bool(name, None, "accepted for the reference's command lines; no effect", flag_values=fv)
    flags.DEFINE_string("experiment", None, "the reference's experiment name = --config=FILE:NAME (alias "
                        "transfer2_auto_multiview_post_train_example = post_train_example)", flag_values=fv)
    flags.DEFINE_integer("num_gpus", None, "use the first N devices (= --config.mesh.num_devices=N)", flag_values=fv)
    flags.DEFINE_integer("context_parallel_size", None, "= --config.mesh.context=N", flag_values=fv)
    h["fields"] = {}
    for field in spec_lib.OVERRIDABLE:
        if isinstance(spec_lib.DEFAULTS[field], bool):
            h["fields"][field] = flags.DEFINE_bool(field, None, f"override the spec's {field}", flag_values=fv)
        else:
            h["fields"][field] = flags.DEFINE_string(field, None, f"override the spec's {field}", flag_values=fv)
    h["config"] = cli_lib.define_config_flag(fv, argv[1:], f"{CONFIG_FILE}:{DEFAULT_VARIANT}",
                                         help_string="run config: " + cli_lib.CONFIG_HELP)
    return h


def parse_args(argv: list[str]) -> InferArgs:
    """The command line (argv[0] = the program) -> InferArgs (CliError on a bad flag; spec files are read later).
    `--help` prints the flags and exits 0."""
    from cosmos_jax.inference import spec as spec_lib

    argv = normalize_argv(list(argv))
    fv = flags.FlagValues()
    try:
        h = _define(fv, argv)
        rest = cli_lib.parse_flags(fv, argv[1:], doc=__doc__, prog=PROG)
        config = cli_lib.config_value(h["config"])
    except cli_lib.UsageError as e:
        raise CliError(str(e)) from None
    if h["print_config"].value:
        return InferArgs(specs=[], output_dir="", checkpoint_path="", config=config, overrides={},
                         debug=h["debug"].value, print_config=True)
    if rest:
        raise CliError(f"unexpected arguments {rest} (spec files go after --spec or -i)")
    if not h["spec"].value:
        raise CliError("no spec file: give --spec FILE.json|FILE.jsonl (or -i / --params_file)")
    if not h["output_dir"].value:
        raise CliError("no output directory: give -o / --output_dir DIR")
    ckpt = h["checkpoint_path"].value or config.model.weights
    if not ckpt:
        raise CliError("no weights: give --checkpoint_path (a .pt file, a DCP or an Orbax checkpoint)")
    if not os.path.exists(ckpt):
        raise CliError(f"--checkpoint_path={ckpt}: no such file or directory")
    out = h["output_dir"].value
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--output_dir={out}: exists and is not a directory")
    overrides = {}
    for field, holder in h["fields"].items():
        if holder.value is None:
            continue
        try:
            overrides[field] = (holder.value if isinstance(holder.value, bool)
                                else spec_lib.parse_override(field, holder.value))
        except spec_lib.SpecError as e:
            raise CliError(str(e)) from None
    return InferArgs(specs=[os.path.abspath(s) for s in h["spec"].value],
                     output_dir=os.path.abspath(out), checkpoint_path=os.path.abspath(ckpt),
                     config=config, overrides=overrides, ema=h["ema"].value, debug=h["debug"].value)


def main(args: InferArgs) -> int:
    """Generate every sample of `args`; errors propagate (`cli` prints them as one line)."""
    if args.print_config:
        cli_lib.print_config(args.config)
        return 0
    from absl import logging

    from cosmos_jax.inference import pipeline, spec as spec_lib

    if not args.debug:
        logging.set_verbosity(logging.WARNING)
    samples = spec_lib.load_specs(args.specs, args.overrides)
    cli_lib.enable_compilation_cache(args.config)
    pipeline.run(args.config, samples, args.output_dir, args.checkpoint_path, ema=args.ema)
    return 0


def main_argv(argv=None) -> int:
    """`python -m cosmos_jax.infer ARGS` (argv without the program) without the error handling of `cli.run`."""
    return main(parse_args([PROG] + list(sys.argv[1:] if argv is None else argv)))


def cli() -> None:
    """The command line (also the console script of pyproject.toml): errors as one line (cosmos_jax/cli.py)."""
    cli_lib.entry(main_argv)


if __name__ == "__main__":
    cli()
