"""What every command line tool of the project shares: one-line errors, `--debug`, `--help`, config flags.

    if __name__ == "__main__":
        cli.entry(main)          # main(argv: list[str] | None) -> int, argv without the program name

`run(main, argv)` calls `main(argv)`. An error caused by what the user gave (a bad flag, a missing or malformed
file, a bad dataset, spec, checkpoint or config value) is printed as ONE line, `error: <message>` on stderr, and
the exit status is 2 (1 for a project `RuntimeError`, e.g. training stopped by non-finite losses). With `--debug`
anywhere on the command line the exception propagates with its traceback instead. Anything else - a genuine
internal bug - is never hidden: Python prints its traceback (exit status 1).

What counts as bad input (`is_input_error`):
  * an exception class of the project (defined under cosmos_jax/, tools/, configs/): `UsageError`, `SpecError`,
    `DatasetError`, `VideoError`, `CacheError`, `WeightsError`, `CheckpointError`, `ConfigError`, ...
  * `OSError` (missing file, not a directory, permission, disk full) and the parse errors of malformed files
    (JSON, zip / .npz, pickle, text encoding, truncated files)
  * absl flag errors (an unknown flag, a value of the wrong type)
  * a builtin `ValueError` / `KeyError` / `TypeError` / `NotImplementedError` raised by a `raise` statement of the
    project's own code (its input checks name the file or field in the message). The same types raised inside a
    library (jax, numpy, ...) or by a plain bug of ours (`d["x"]` on a missing key) are not: they keep their
    traceback.

Config-taking entry points (train, infer, forward) define their config flag through `define_config_flag`: a
missing config file, an unknown variant or a typo in `--config.a.b=v` is an error naming the flag, with the closest
field as a suggestion, and `--print_config` prints the resolved config (`print_config`).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import pickle
import re
import sys
import traceback
import zipfile

from cosmos_jax import atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "configs", "transfer2_auto_multiview.py")
CONFIG_HELP = ("config file and variant, FILE:VARIANT (variants: tiny, post_train_example). Every field can be "
               "overridden with --config.<section>.<field>=VALUE; the fields and what they mean are documented in "
               "the config file (configs/transfer2_auto_multiview.py: its docstring, and a comment at every field); "
               "--print_config prints the resolved config")
DEBUG_HELP = "show the Python traceback of an error instead of the one-line message"
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")

_PROJECT_DIRS = ("cosmos_jax", "tools", "configs")
_PROJECT_MODULES = ("cosmos_jax", "tools", "configs", "__main__")
# builtin / library exceptions that always mean "this input is bad" (each tool checks its files so that the
# message names them; these are the fallback)
_INPUT_TYPES = (OSError, EOFError, UnicodeError, json.JSONDecodeError, zipfile.BadZipFile, pickle.UnpicklingError)
# builtin types that are input checks when our own code raises them on purpose
_CHECK_TYPES = (ValueError, KeyError, TypeError, NotImplementedError, RuntimeError)


class UsageError(ValueError):
    """A bad command line or input found by a tool's own checks; the message names the flag or file."""


# ------------------------------------------------------------------------------------------------ errors

def _project_class(cls: type) -> bool:
    return any(c.__module__.split(".")[0] in _PROJECT_MODULES for c in cls.__mro__)


def _raised_by_our_check(exc: BaseException) -> bool:
    """The innermost frame is a `raise` statement in the project's source (not a library's, not a bare
    subscript or call that failed)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    last = traceback.extract_tb(tb)[-1]
    path = os.path.abspath(last.filename)
    if not path.startswith(REPO + os.sep) or os.path.relpath(path, REPO).split(os.sep)[0] not in _PROJECT_DIRS:
        return False
    return (last.line or "").lstrip().startswith("raise")


def is_input_error(exc: BaseException) -> bool:
    """True for errors that come from what the user gave (see the module docstring); False for internal bugs."""
    if not isinstance(exc, Exception):
        return False
    if _project_class(type(exc)) or isinstance(exc, _INPUT_TYPES):
        return True
    try:
        from absl import flags

        if isinstance(exc, flags.Error):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, _CHECK_TYPES) and _raised_by_our_check(exc)


def one_line(text: str) -> str:
    """A message on one line: a wrapped traceback (config_flags wraps config-file errors) gives its last line;
    line breaks become `; ` (after `:` or `(` a space)."""
    text = str(text).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1]
    parts = [" ".join(p.split()) for p in text.splitlines() if p.strip()]
    out = parts[0] if parts else ""
    for p in parts[1:]:
        out += (" " if out.endswith((":", "(", ",", ";")) else "; ") + p
    return out


def message(exc: BaseException) -> str:
    """The one-line text of an input error."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
        if exc.filename2 is not None:
            text += f" (-> {exc.filename2})"
    elif isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError) would quote and escape it
    else:
        text = str(exc)
    return one_line(text) or type(exc).__name__


def exit_code(exc: BaseException) -> int:
    """2 for bad input; 1 for a run that failed on its own (a project RuntimeError: training diverged, ...)."""
    return 1 if isinstance(exc, RuntimeError) and _project_class(type(exc)) else 2


def wants_debug(argv) -> bool:
    """`--debug` (absl or argparse spelling) anywhere before a `--`."""
    for a in argv:
        if a == "--":
            return False
        if a.startswith("-") and a.lstrip("-").split("=", 1)[0] == "debug":
            value = a.split("=", 1)[1].lower() if "=" in a else "true"
            return value in ("true", "1", "yes", "t", "y")
    return False


def run(main, argv=None) -> int:
    """`main(argv)` with the project's error handling (module docstring); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = wants_debug(argv)
    try:
        code = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - filtered right below; everything else is re-raised
        if debug or not is_input_error(e):
            raise
        sys.stdout.flush()
        print(f"error: {message(e)}", file=sys.stderr)
        return exit_code(e)
    return 0 if code is None else int(code)


def entry(main) -> None:
    """`if __name__ == "__main__": cli.entry(main)`."""
    sys.exit(run(main))


# ------------------------------------------------------------------------------------------------ argparse

class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: a bad command line is a `UsageError` (one line, exit status 2,
    instead of argparse's usage block), every parser (and sub-command) has `--debug`, the description is shown
    verbatim."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see --help)")


def atomic_savez(path: str, **arrays) -> str:
    """np.savez to `path` (".npz" appended when missing, as numpy does) through a temporary file in the same
    folder: an interrupted write never leaves a truncated file or damages an existing one. Returns the path."""
    import numpy as np

    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: the folder {folder} does not exist")
    with atomic.temporary_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


# ------------------------------------------------------------------------------------------------ absl / configs

def _flag_value(argv, name: str) -> str | None:
    """The last value given for `--name` (`--name=V` or `--name V`) in argv."""
    value = None
    for i, a in enumerate(argv):
        if a == "--":
            break
        if re.fullmatch(rf"--?{name}", a) and i + 1 < len(argv):
            value = argv[i + 1]
        elif re.match(rf"--?{name}=", a):
            value = a.split("=", 1)[1]
    return value


def load_config(spec: str, flag: str = "--config"):
    """`get_config(VARIANT)` of FILE for `FILE:VARIANT`, as ml_collections' config flag loads it; a missing file or
    a variant the file refuses is a UsageError naming the flag."""
    path, *arg = spec.split(":", 1)
    if not os.path.isfile(path):
        raise UsageError(f"{flag}={spec}: no such config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_cosmos_jax_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"{flag}={spec}: {path} has no get_config()")
    try:
        return module.get_config(*arg)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{flag}={spec}: {message(e)}") from e


def check_overrides(config, argv, name: str = "config") -> None:
    """Every `--config.a.b[=v]` names an existing field; else a UsageError naming the flag and the closest field."""
    for a in argv:
        if a == "--":
            break
        m = re.match(rf"^--?(?:no)?{name}\.([^=]+)", a)
        if not m:
            continue
        flag = a.split("=", 1)[0]
        node, walked = config, [name]
        for part in m.group(1).split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else None
            if keys is None:
                raise UsageError(f"{flag}: {'.'.join(walked)} is a value ({node!r}), not a section with fields")
            if part not in keys:
                where = ".".join(walked)
                close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
                hint = (f"did you mean {where}.{close[0]}?" if close
                        else f"{where} has: {', '.join(sorted(keys))}")
                raise UsageError(f"{flag}: unknown config field {where}.{part} ({hint})")
            node = node[part]
            walked.append(part)


def define_config_flag(fv, argv, default: str, *, name: str = "config", help_string: str = CONFIG_HELP):
    """An ml_collections config-file flag on FlagValues `fv` for `argv` (without the program name), after checking
    that the config loads and every override names a field (one-line UsageErrors instead of config_flags'
    tracebacks). Returns the flag holder; read the config with `config_value`."""
    from ml_collections import config_flags

    spec = _flag_value(argv, name) or default
    check_overrides(load_config(spec, f"--{name}"), argv, name)
    try:
        return config_flags.DEFINE_config_file(name, default, help_string, flag_values=fv, lock_config=True,
                                               sys_argv=["prog"] + list(argv))
    except (KeyError, AttributeError, TypeError, ValueError) as e:  # config_flags parses the default right here
        raise UsageError(message(e)) from None


def config_value(holder):
    """The parsed config (a load failure config_flags deferred is raised here, as a UsageError)."""
    config = holder.value
    if not hasattr(config, "to_dict"):  # config_flags' _ErrorConfig: raises its load error on any access
        try:
            config.lock()
        except OSError as e:
            raise UsageError(f"--{holder.name}: {message(e)}") from None
    return config


def print_config(config) -> None:
    print(config, end="" if str(config).endswith("\n") else "\n")


def parse_config_command(argv, default: str, *, doc: str, prog: str, debug_help: str = DEBUG_HELP):
    """The command line of a command that takes only a config (train, forward): `--config FILE:VARIANT`,
    `--config.a.b=v` overrides, `--print_config`, `--debug`; positional arguments are a UsageError. Returns
    (config, debug), or (None, debug) after `--print_config` printed the resolved config."""
    from absl import flags

    fv = flags.FlagValues()
    print_flag = flags.DEFINE_bool("print_config", False, "print the resolved config (overrides applied) and exit",
                                   flag_values=fv)
    debug = flags.DEFINE_bool("debug", False, debug_help, flag_values=fv)
    config_flag = define_config_flag(fv, argv, default)
    rest = parse_flags(fv, argv, doc=doc, prog=prog)
    if rest:
        raise UsageError(f"unexpected arguments {rest} (see {prog} --help)")
    config = config_value(config_flag)
    if print_flag.value:
        print_config(config)
        return None, debug.value
    return config, debug.value


def parse_flags(fv, argv, *, doc: str, prog: str) -> list[str]:
    """Parse absl FlagValues `fv` from argv (without the program name); `--help` prints `doc` and every flag and
    exits 0; a bad flag is a UsageError. Returns the positional arguments."""
    from absl import flags

    if any(a in HELP_FLAGS for a in argv[: argv.index("--") if "--" in argv else len(argv)]):
        print(help_text(fv, doc, prog))
        raise SystemExit(0)
    try:
        rest = fv([prog] + list(argv))
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        raise UsageError(f"{message(e)} (see {prog} --help)") from None
    flags.FLAGS.mark_as_parsed()  # absl users (logging, Grain) see parsed flags
    return rest[1:]


def help_text(fv, doc: str, prog: str) -> str:
    """`doc`, then every flag of `fv` with its help text and default, in one alphabetical list."""
    unique = {id(f): f for f in fv._flags().values()}  # a flag with a short name appears twice
    try:
        lines: list[str] = []
        fv._render_flag_list(sorted(unique.values(), key=lambda f: f.name), lines, "  ")
        listing = "\n".join(lines)
    except AttributeError:  # pragma: no cover - absl without the (private) renderer
        listing = fv.get_help(include_special_flags=False)
    return f"usage: {prog} [flags]\n\n{doc.strip()}\n\nflags:\n{listing}"


def enable_compilation_cache(config) -> str | None:
    """Turn on JAX's persistent compilation cache for a command (train, infer): a restarted or resumed job loads its
    compiled programs instead of compiling them again. `config.job.compilation_cache_dir`: "auto" =
    <output_root>/xla_cache, "" = off, else a path (a shared file system for several hosts). The environment's
    JAX_COMPILATION_CACHE_DIR, where set, wins (JAX reads it itself). -> the folder used, or None."""
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        return env
    path = config.job.get("compilation_cache_dir", "")  # absent from configs saved before it existed: off
    if not path:
        return None
    if path == "auto":
        path = os.path.join(config.job.output_root, "xla_cache")
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    return path
