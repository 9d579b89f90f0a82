"""World-scenario control rendering throughput: frames per second per camera, render only and render + encode.

    python bench/bench_render.py                                  # the oracle clip (tests/fixtures/control_render)
    python bench/bench_render.py --scene RDSHQ_DIR --frames 30 --cameras all --samples 4,1 --workers 1,4

The renderer is numpy on the CPU (no GPU or display is used, whatever the machine has); the device line says
which CPU ran it and which accelerators JAX sees (unused here). More frames than the clip holds are drawn by
resampling its timeline (--fps), which interpolates poses and objects between the clip's frames.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

DEFAULT_SCENE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                             "control_render", "caseA", "scene")


def device_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    accel = "not checked"
    try:
        import jax

        accel = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    except Exception as e:  # noqa: BLE001 - jax missing or no backend: report it
        accel = f"jax unavailable ({type(e).__name__})"
    return f"device: numpy rasteriser on CPU ({cpu}, {cores} cores usable); JAX devices (unused): {accel}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", default=DEFAULT_SCENE, help="an RDS-HQ clip (default: the oracle clip)")
    ap.add_argument("--cameras", default="camera_front_wide_120fov,camera_front_tele_30fov",
                    help="'all' or a comma list")
    ap.add_argument("--frames", type=int, default=6, help="frames rendered per camera and configuration")
    ap.add_argument("--samples", default="4,1", help="MSAA sample counts to time (4 = the reference's)")
    ap.add_argument("--workers", default="1", help="process counts for the end-to-end CLI run (e.g. 1,4)")
    ap.add_argument("--json", default="", help="append the records to this JSON-lines file")
    args = ap.parse_args(argv)

    from cosmos_jax.data import video
    from cosmos_jax.worldscenario import pipeline, rdshq, render

    print(device_line(), flush=True)
    has_av = importlib.util.find_spec("av") is not None  # the renderer needs no PyAV; encoding and the CLI do
    cams = pipeline.parse_cameras(args.cameras)
    scene = rdshq.load_scene(args.scene, cams)
    span_s = (scene.timestamps[-1] - scene.timestamps[0]) / 1e6
    fps = scene.source_fps if scene.num_frames >= args.frames else (args.frames - 1) / max(span_s, 1e-6)
    times = render.frame_times(scene, fps, args.frames)
    records = []
    tmp = tempfile.mkdtemp(prefix="bench_render-")
    try:
        for samples in [int(s) for s in args.samples.split(",")]:
            opts = render.RenderOptions(samples=samples)
            t0 = time.perf_counter()
            static = render.prepare_static(scene)
            prep = time.perf_counter() - t0
            for cam in cams:
                render.render_camera(scene, cam, times[:1], static, opts)  # warm-up (camera fit, caches)
                per_frame = []
                frames = []
                for t in times:
                    t0 = time.perf_counter()
                    frames.append(render.render_camera(scene, cam, np.array([t]), static, opts)[0])
                    per_frame.append(time.perf_counter() - t0)
                render_s = sum(per_frame)
                rec = dict(camera=cam, samples=samples, frames=len(times), static_prep_s=round(prep, 3),
                           render_fps=round(len(times) / render_s, 3),
                           median_frame_s=round(statistics.median(per_frame), 3))
                if has_av:
                    t0 = time.perf_counter()
                    video.write_video(os.path.join(tmp, f"{cam}.mp4"), np.stack(frames), 30.0, crf=pipeline.CRF)
                    rec["render_encode_fps"] = round(len(times) / (render_s + time.perf_counter() - t0), 3)
                records.append(rec)
                print(f"{cam:28s} samples={samples}  render {rec['render_fps']:6.2f} fps "
                      f"(median {rec['median_frame_s']:.3f} s/frame)  render+encode "
                      + (f"{rec['render_encode_fps']:6.2f} fps" if has_av else "not timed (PyAV not installed)"),
                      flush=True)
        for workers in [int(w) for w in args.workers.split(",")] if has_av else []:
            out = os.path.join(tmp, f"run{workers}")
            job = pipeline.Job(args.scene, out, tuple(cams), max_frames=len(times), fps=fps, workers=workers)
            t0 = time.perf_counter()
            pipeline.run(job)
            wall = time.perf_counter() - t0
            rec = dict(end_to_end=True, workers=workers, cameras=len(cams), frames=len(times),
                       camera_frames_per_s=round(len(cams) * len(times) / wall, 3), wall_s=round(wall, 2))
            records.append(rec)
            print(f"CLI pipeline, {workers} worker(s): {len(cams)} cameras x {len(times)} frames in {wall:.1f} s = "
                  f"{rec['camera_frames_per_s']:.2f} camera-frames/s (load, render, encode, write)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "a") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
