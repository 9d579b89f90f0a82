"""Check a multiview dataset in the reference layout; print a summary and every problem with its file.

    python tools/validate_dataset.py assets/multiview_hdmap_posttrain_dataset
    python tools/validate_dataset.py /data/mv --frames 29 --stride 3 --cameras camera_front_wide_120fov,...

Exit status 0 when every sample is usable; 1 when any sample is unusable (missing view/control/caption, no
"caption", fps mismatch, too short, undecodable) or there are none; 2 when the dataset cannot be checked at all (the
path does not exist, a bad flag).
"""

from __future__ import annotations

import os

from cosmos_jax import cameras as cams
from cosmos_jax import cli as cli_lib
from cosmos_jax.data import layout

PROG = "tools/validate_dataset.py"
_DATASET_LEVEL = "<dataset>"  # layout.validate's key for a problem of the whole dataset


def main(argv=None) -> int:
    ap = cli_lib.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("dataset", help="dataset root (videos/, control_input_hdmap_bbox/, captions/)")
    ap.add_argument("--frames", type=int, default=29, help="frames per view a sample needs (default 29)")
    ap.add_argument("--stride", type=int, default=1, help="frame stride (the reference's fps_downsample_factor)")
    ap.add_argument("--cameras", default=",".join(cams.CAMERAS),
                    help="comma-separated cameras, in sample order (default: the 7 of the base rig)")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.stride < 1:
        raise cli_lib.UsageError(f"--frames={args.frames} --stride={args.stride}: both must be >= 1")
    if not os.path.isdir(args.dataset):
        raise cli_lib.UsageError(f"{args.dataset}: " + ("not a directory" if os.path.exists(args.dataset)
                                                    else "no such dataset directory"))
    try:
        spec = layout.SampleSpec(cameras=tuple(args.cameras.split(",")), num_frames=args.frames, stride=args.stride)
    except ValueError as e:
        raise cli_lib.UsageError(f"--cameras={args.cameras}: {e}") from None
    n, bad = layout.validate(args.dataset, spec)
    for name, problems in sorted(bad.items()):
        for p in problems:
            print(f"[{name}] {p}")
    # a sample with only "no caption" problems is a video without a caption: never used, not a sample
    unusable = len([k for k in bad if k != _DATASET_LEVEL and any("no caption" not in p for p in bad[k])])
    print(f"{args.dataset}: {n} samples, {n - unusable} usable, {unusable} unusable, "
          f"{len(spec.cameras)} cameras, {spec.num_frames} frames at stride {spec.stride}")
    return 1 if unusable or n == 0 else 0


def cli() -> None:
    """The command line (also the console script of pyproject.toml): errors as one line (cosmos_jax/cli.py)."""
    cli_lib.entry(main)


if __name__ == "__main__":
    cli()
