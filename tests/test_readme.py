"""The README's commands are ones that exist: every `python -m cosmos_jax.X`, `python tools/X.py` and
`python bench/X.py` line in it names a real command, each `--flag` it uses is in that command's `--help`, and each
`--config.a.b=v` override is a key of the config variant it runs. Its first bash block holds exactly the two
set-up commands, the second being the test command `.ci/run` runs."""

import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from configs import transfer2_auto_multiview as cfg_file
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    """Every python command of the README's bash blocks, as argument lists (continuations joined, && split)."""
    out = []
    for block in _bash_blocks():
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                args = shlex.split(part.strip())
                while args and "=" in args[0] and not args[0].startswith("-"):  # ENV=value prefixes
                    args = args[1:]
                if len(args) >= 2 and args[0] == "python" and args[1] != "-m" or args[:2] == ["python", "-m"]:
                    if args[1] == "-m" and args[2] == "pytest":
                        continue
                    out.append(args[1:])
    return out


@functools.lru_cache(maxsize=None)
def _help(target: tuple[str, ...]) -> str:
    proc = subprocess.run([sys.executable, *target, "--help"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 0, f"{' '.join(target)} --help exited {proc.returncode}: {proc.stderr[-500:]}"
    return proc.stdout + proc.stderr


def _target(args):
    return tuple(args[:2]) if args[0] == "-m" else (args[0],)


def test_first_block_is_the_two_setup_commands():
    lines = [ln for ln in _bash_blocks()[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(lines) == 2, lines
    assert "python -m cosmos_jax.train" in lines[0] and lines[0].startswith("pip install")
    assert lines[1].startswith("pip install") and lines[1].endswith("python -m pytest -q")
    assert "awk" in (REPO / ".ci" / "run").read_text()  # .ci/run reads its command from this block


def test_readme_commands_exist_and_use_real_flags():
    commands = _commands()
    assert len(commands) >= 8
    problems = []
    for args in commands:
        target = _target(args)
        if target[0] != "-m" and not (REPO / target[0]).is_file():
            problems.append(f"{target[0]}: no such script")
            continue
        if target[0] == "-m" and not (REPO / (target[1].replace(".", "/") + ".py")).is_file():
            problems.append(f"{target[1]}: no such module")
            continue
        text = _help(target)
        variant = "post_train_example" if target == ("-m", "cosmos_jax.infer") else "tiny"
        for a in args[len(target):]:
            if a.startswith("--config="):
                variant = a.split(":")[-1]
            elif a.startswith("--experiment="):
                variant = a.split("=", 1)[1]
        for i, a in enumerate(args[len(target):]):
            if a == "--config" and i + 1 < len(args) - len(target):
                variant = args[len(target) + i + 1].split(":")[-1]
            if a == "--experiment" and i + 1 < len(args) - len(target):
                variant = args[len(target) + i + 1]
        config = cfg_file.get_config(cfg_file.ALIASES.get(variant, variant))
        for a in args[len(target):]:
            if not a.startswith("--"):
                continue
            name = a.split("=", 1)[0]
            if name.startswith("--config."):
                node = config
                for key in name[len("--config."):].split("."):
                    if key not in node:
                        problems.append(f"{' '.join(target)}: {name} is not a key of the {variant} config")
                        break
                    node = node[key]
            elif not re.search(rf"(^|[\s,\[]){re.escape(name)}\b", text, flags=re.M):
                problems.append(f"{' '.join(target)}: {name} is not in its --help")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("tool", ["tools/render_control.py", "tools/export.py", "tools/precompute.py"])
def test_the_check_can_fail(tool):
    """The flag check above must notice a flag a command does not have."""
    assert not re.search(r"(^|[\s,\[])--no-such-flag\b", _help((tool,)), flags=re.M)
