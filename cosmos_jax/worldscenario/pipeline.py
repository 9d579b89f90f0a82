"""One clip -> world-scenario control videos in the post-training layout (what `tools/render_control.py` runs).

Spec: `docs/control_videos.md` §3.10: 1280x720 RGB on black, H.264 (libx264 crf 18, yuv420p) MP4, one video per
camera; written as `OUT/control_input_hdmap_bbox/ftheta_<camera>/<name>.mp4` (the post-training layout, §3.10
"post-train target"), `<name>` = the clip id by default. Optional: `OUT/raw/<camera>.npy` (uint8 [T, 720, 1280, 3],
the frames before encoding) and `OUT/preview/<name>.mp4` (3x3 grid of the cameras). Every file is written to a
temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

from cosmos_jax import atomic
from cosmos_jax.data import video
from cosmos_jax.worldscenario import rdshq, render, rig
from cosmos_jax.worldscenario.scene import SceneError

log = logging.getLogger("cosmos_jax.worldscenario")

CONTROL_FOLDER = "control_input_hdmap_bbox"
CRF = 18  # local.py imageio writer: libx264 -crf 18
PREVIEW_TILE = (240, 426)  # (H, W) per camera in the 3x3 preview grid


def parse_cameras(spec: str) -> list[str]:
    """`all` -> the 7 default cameras (reference order); else a comma list. The documented colon form
    (camera:front:wide:120fov) is accepted and mapped to the underscore form the data uses."""
    if spec is None or spec.strip().lower() == "all":
        return list(rig.DEFAULT_CAMERAS)
    names = []
    for part in spec.split(","):
        name = part.strip().replace(":", "_")
        if not name:
            continue
        if name not in names:
            names.append(name)
    if not names:
        raise SceneError(f"--cameras {spec!r} names no camera")
    return names


def control_path(out_dir: str, camera: str, name: str) -> str:
    return os.path.join(out_dir, CONTROL_FOLDER, f"ftheta_{camera}", f"{name}.mp4")


def preview_tile(clip: np.ndarray) -> np.ndarray:
    """One camera's frames at preview-tile size (antialiased resize)."""
    return video.resize(clip, PREVIEW_TILE)


def preview_grid(tiles: list[np.ndarray]) -> np.ndarray:
    """uint8 (T, 720, 1278, 3): tiles in camera order, 3 per row (at most 9; empty tiles black)."""
    th, tw = PREVIEW_TILE
    n = max(len(t) for t in tiles)
    grid = np.zeros((n, 3 * th, 3 * tw, 3), np.uint8)
    for i, small in enumerate(tiles[:9]):
        r, c = divmod(i, 3)
        grid[: len(small), r * th:(r + 1) * th, c * tw:(c + 1) * tw] = small
    return grid


@dataclasses.dataclass(frozen=True)
class Job:
    """What to render and where (the CLI's flags)."""

    scene_dir: str
    out_dir: str
    cameras: tuple[str, ...] = rig.DEFAULT_CAMERAS
    max_frames: int | None = None
    fps: float | None = None  # None: the clip's own 30 fps frames
    name: str | None = None
    raw: bool = False
    preview: bool = False
    clip_id: str | None = None
    options: render.RenderOptions = render.RenderOptions()
    workers: int = 1  # processes rendering cameras in parallel


def _render_and_write(job: Job, scene, cam: str, name: str, times: np.ndarray, static) -> dict:
    """Render one camera's clip and write its video (and raw frames); returns paths, preview tile, timing."""
    t0 = time.perf_counter()
    clip = render.render_camera(scene, cam, times, static, job.options)
    seconds = time.perf_counter() - t0
    fps = job.fps or scene.source_fps
    path = control_path(job.out_dir, cam, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    video.write_video(path, clip, fps, crf=CRF)
    out = {"control": path, "raw": None, "tile": preview_tile(clip) if job.preview else None,
           "frames": len(clip), "seconds": seconds}
    if job.raw:
        raw_path = os.path.join(job.out_dir, "raw", f"{cam}.npy")
        os.makedirs(os.path.dirname(raw_path), exist_ok=True)
        atomic.save_npy(raw_path, clip)
        out["raw"] = raw_path
    return out


def _worker(job: Job, cam: str, name: str, times: np.ndarray) -> dict:
    """Process-pool entry: reload the clip (warnings were shown by the parent) and render one camera."""
    logging.getLogger("cosmos_jax.worldscenario").setLevel(logging.ERROR)
    scene = rdshq.load_scene(job.scene_dir, [cam], job.clip_id)
    return _render_and_write(job, scene, cam, name, times, render.prepare_static(scene, job.options.compat))


def run(job: Job, progress=None) -> dict[str, list[str]]:
    """Load, render every requested camera, write the videos (and raw frames / preview). Returns written paths."""
    if job.max_frames is not None and job.max_frames <= 0:
        raise SceneError(f"--max-frames must be positive, got {job.max_frames}")
    if job.fps is not None and not job.fps > 0:
        raise SceneError(f"--fps must be positive, got {job.fps}")
    if job.workers < 1:
        raise SceneError(f"--workers must be at least 1, got {job.workers}")
    scene = rdshq.load_scene(job.scene_dir, list(job.cameras), job.clip_id)
    name = job.name or scene.clip_id
    if not name or os.sep in name or name in (".", ".."):
        raise SceneError(f"--name {name!r} is not a file name")
    times = render.frame_times(scene, job.fps, job.max_frames)
    if len(times) == 0:
        raise SceneError(f"{job.scene_dir}: the clip has no frames")
    for cam in job.cameras:  # fail before writing anything when a camera model is unusable
        try:
            render.camera_model(scene, cam, job.options)
        except ValueError as e:
            raise SceneError(f"camera {cam}: {e}") from e
    job = dataclasses.replace(job, clip_id=scene.clip_id)
    if job.workers > 1 and len(job.cameras) > 1:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(job.workers, len(job.cameras)), mp_context=ctx) as pool:
            futures = [pool.submit(_worker, job, cam, name, times) for cam in job.cameras]
            results = []
            for cam, fut in zip(job.cameras, futures):
                results.append(fut.result())
                if progress:
                    r = results[-1]
                    progress(f"{cam}: {r['frames']} frames in {r['seconds']:.1f} s -> {r['control']}")
    else:
        static = render.prepare_static(scene, job.options.compat)
        results = []
        for cam in job.cameras:
            results.append(_render_and_write(job, scene, cam, name, times, static))
            if progress:
                r = results[-1]
                progress(f"{cam}: {r['frames']} frames in {r['seconds']:.1f} s -> {r['control']}")
    written = {"control": [r["control"] for r in results], "raw": [r["raw"] for r in results if r["raw"]],
               "preview": []}
    if job.preview:
        path = os.path.join(job.out_dir, "preview", f"{name}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        video.write_video(path, preview_grid([r["tile"] for r in results]), job.fps or scene.source_fps, crf=CRF)
        written["preview"].append(path)
        if progress:
            progress(f"preview -> {path}")
    return written
