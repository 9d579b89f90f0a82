"""Check a multiview dataset in the reference layout; print a summary and every problem with its file.

    python tools/validate_dataset.py assets/multiview_hdmap_posttrain_dataset
    python tools/validate_dataset.py /data/mv --frames 29 --stride 3 --cameras camera_front_wide_120fov,...

Exit status 1 when any sample is unusable (missing view/control/caption, no "caption", fps mismatch, too short,
undecodable), else 0.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cosmos_jax import cameras as cams  # noqa: E402
from cosmos_jax.data import layout  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--frames", type=int, default=29)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--cameras", default=",".join(cams.CAMERAS))
    args = ap.parse_args(argv)
    spec = layout.SampleSpec(cameras=tuple(args.cameras.split(",")), num_frames=args.frames, stride=args.stride)
    n, bad = layout.validate(args.dataset, spec)
    for name, problems in sorted(bad.items()):
        for p in problems:
            print(f"[{name}] {p}")
    unusable = len([k for k in bad if any("no caption" not in p for p in bad[k])])
    print(f"{args.dataset}: {n} samples, {n - unusable} usable, {unusable} unusable, "
          f"{len(spec.cameras)} cameras, {spec.num_frames} frames at stride {spec.stride}")
    return 1 if unusable or n == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
