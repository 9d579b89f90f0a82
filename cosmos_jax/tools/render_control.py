"""Render world-scenario ("HDMap + bbox") control videos of one RDS-HQ clip, on the CPU, as the reference does.

    python tools/render_control.py SCENE_DIR OUT_DIR                       # all 7 cameras, every 30 fps frame
    python tools/render_control.py SCENE_DIR OUT_DIR --cameras camera_front_wide_120fov,camera_front_tele_30fov \\
        --max-frames 29 --fps 10 --raw --preview

Writes OUT_DIR/control_input_hdmap_bbox/ftheta_<camera>/<name>.mp4 (1280x720 H.264; <name> = the clip id, the
pose tar's file name, unless --name), with --raw OUT_DIR/raw/<camera>.npy (uint8 [T, 720, 1280, 3], the frames
before encoding) and with --preview OUT_DIR/preview/<name>.mp4 (3x3 grid of the cameras). Lanes, road boundaries,
crosswalks, markings, poles, signs, traffic lights and 3D boxes are drawn through f-theta cameras exactly as the
reference renderer (scripts/generate_control_videos.py) draws them, quirks included (--compat reference); see
docs/control_videos.md. Errors are one line (exit 2); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cosmos_jax.worldscenario import palette, pipeline, render


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scene_dir", metavar="SCENE_DIR",
                    help="one clip in the RDS-HQ layout (pose/ or vehicle_pose/, ftheta_intrinsic/, "
                         "all_object_info/, 3d_*/ folders of <clip>.tar)")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="dataset root to write control_input_hdmap_bbox/ into")
    ap.add_argument("--cameras", default="all",
                    help="'all' (the 7 cameras of the auto-multiview rig) or a comma list of camera names, "
                         "e.g. camera_front_wide_120fov,camera_front_tele_30fov (default: all)")
    ap.add_argument("--max-frames", type=int, default=None, metavar="N",
                    help="render only the first N output frames (default: the whole clip)")
    ap.add_argument("--fps", type=float, default=None, metavar="F",
                    help="output frame rate: frames every 1/F s from the clip's first frame, poses and objects "
                         "interpolated (default: the clip's own 30 fps frames, as the reference)")
    ap.add_argument("--name", default=None,
                    help="output file stem (default: the clip id = the pose tar's file name)")
    ap.add_argument("--clip-id", default=None,
                    help="which clip to render when SCENE_DIR holds several (default: the only one)")
    ap.add_argument("--raw", action="store_true",
                    help="also write OUT_DIR/raw/<camera>.npy, the uint8 frames before encoding")
    ap.add_argument("--preview", action="store_true",
                    help="also write OUT_DIR/preview/<name>.mp4, a 3x3 grid of the rendered cameras")
    ap.add_argument("--compat", choices=palette.COMPAT_MODES, default="reference",
                    help="reference: the reference renderer's pixels, quirks included (trucks in the Others "
                         "colour, unknown laneline styles olive, convex-hull polygons); fixed: the documented "
                         "fixes (default: reference)")
    ap.add_argument("--samples", type=int, choices=(4, 1), default=4,
                    help="anti-aliasing samples per pixel: 4 (the reference's 4x MSAA) or 1 (faster)")
    ap.add_argument("--workers", type=int, default=1, metavar="N",
                    help="render cameras in N parallel processes (default: 1)")
    ap.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    try:
        job = pipeline.Job(
            scene_dir=args.scene_dir, out_dir=args.out_dir, cameras=tuple(pipeline.parse_cameras(args.cameras)),
            max_frames=args.max_frames, fps=args.fps, name=args.name, raw=args.raw, preview=args.preview,
            clip_id=args.clip_id, options=render.RenderOptions(compat=args.compat, samples=args.samples),
            workers=args.workers)
        written = pipeline.run(job, progress=None if args.quiet else print)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {len(written['control'])} control video(s) under "
              f"{os.path.join(args.out_dir, pipeline.CONTROL_FOLDER)}")
    return 0


def cli() -> None:
    """Console-script / `python tools/render_control.py` entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
