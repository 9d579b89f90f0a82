"""Export a training checkpoint to the reference's .pt files: model.pt, model_ema_fp32.pt, model_ema_bf16.pt and a
manifest.json (cosmos_jax/weights/export.py says what each holds).

    python tools/export.py /tmp/cosmos_jax-output/.../checkpoints OUT_DIR          # ours: latest complete step
    python tools/export.py .../checkpoints/iter_000000200 OUT_DIR                   # ours: one step
    python tools/export.py $CHECKPOINT_DIR/model $CHECKPOINT_DIR                    # reference DCP (converter's form)
    python tools/export.py .../checkpoints OUT_DIR --step 400 --no-ema

SRC is recognised automatically (Orbax or DCP). Files appear under their final names only once complete: a failed or
interrupted export leaves the previous files in OUT_DIR untouched. A bad SRC is one line naming it (--debug: the
traceback).
"""

from __future__ import annotations

import os

from cosmos_jax import cli as cli_lib


PROG = "tools/export.py"


def main(argv=None) -> int:
    """Export; errors propagate (the command line prints them as one line through `cli.run`)."""
    ap = cli_lib.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("src", metavar="SRC", help="Orbax checkpoints/ or step dir; DCP model/, iter_* or checkpoints/ dir")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created); existing files are replaced only "
                    "once the new ones are complete")
    ap.add_argument("--step", type=int, default=None, help="the step to export (default: the latest complete one)")
    ap.add_argument("--no-ema", dest="ema", action="store_false",
                    help="write model.pt only (as the reference converter's --no-ema)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = ap.parse_args(argv)
    if args.step is not None and args.step < 0:
        raise cli_lib.UsageError(f"--step={args.step}: must be >= 0")

    import importlib.util

    if importlib.util.find_spec("torch") is None:  # .pt files are written with torch's own zip writer
        raise cli_lib.UsageError("the export needs torch (a CPU build is enough: pip install torch==2.13.0 "
                             "--index-url https://download.pytorch.org/whl/cpu)")
    from cosmos_jax.weights import export

    manifest = export.export(args.src, args.out_dir, step=args.step, ema=args.ema, progress=args.progress)
    src = manifest["source"]
    for name, f in manifest["files"].items():
        print(f"wrote {os.path.join(os.path.abspath(args.out_dir), name)} ({len(f['tensors'])} tensors, "
              f"{f['bytes'] / 2**20:.1f} MiB)")
    print(f"from {src['kind']} checkpoint {src['path']} (step {src['step']}); "
          f"manifest: {os.path.join(os.path.abspath(args.out_dir), export.MANIFEST)}")
    return 0


def cli() -> None:
    """The command line (also the console script of pyproject.toml): errors as one line (cosmos_jax/cli.py)."""
    cli_lib.entry(main)


if __name__ == "__main__":
    cli()
