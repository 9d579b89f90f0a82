"""Render a synthetic multiview HDMap dataset in the reference layout (for the demo, tests and benchmarks).

    python tools/make_sample_dataset.py assets/multiview_hdmap_posttrain_dataset              # the committed one
    python tools/make_sample_dataset.py /data/bench720 --samples 8 --height 720 --width 1280  # benchmark size

Each sample is an ego car driving down a straight multi-lane road with other cars, seen by the 7 cameras of the
auto-multiview rig (each at its own heading and field of view): `videos/` holds shaded RGB renders (sky, asphalt,
lane markings, car boxes), `control_input_hdmap_bbox/` the matching HDMap-style renders (lane lines and box
outlines in flat colours on black), `captions/` one caption for the front camera. Deterministic for a seed.

    python tools/make_sample_dataset.py /tmp/ws --control worldscenario   # controls by the reference-faithful
                                                                          # world-scenario renderer, f-theta rig
"""

from __future__ import annotations

import json
import math
import os


import numpy as np

from cosmos_jax import cameras as cams
from cosmos_jax import cli as cli_lib
from cosmos_jax.data import video

# camera heading (degrees, left positive) and horizontal field of view
RIG = {
    "camera_front_wide_120fov": (0.0, 120.0), "camera_cross_right_120fov": (-70.0, 120.0),
    "camera_rear_right_70fov": (-135.0, 70.0), "camera_rear_tele_30fov": (180.0, 30.0),
    "camera_rear_left_70fov": (135.0, 70.0), "camera_cross_left_120fov": (70.0, 120.0),
    "camera_front_tele_30fov": (0.0, 30.0),
}
LANES = (-5.25, -1.75, 1.75, 5.25)  # lane-line lateral offsets (m)
CONTROL_ROUTES = ("synthetic", "worldscenario")
CAM_HEIGHT = 1.6


def _scene(rng: np.random.Generator, n_cars: int = 6):
    """Cars: (x0 forward m, y lateral m, speed m/s relative to ego, colour)."""
    xs = rng.uniform(-40, 60, n_cars)
    ys = rng.choice([-3.5, 0.0, 3.5, 7.0], n_cars)
    vs = rng.uniform(-4, 4, n_cars)
    cols = rng.integers(40, 230, (n_cars, 3))
    return xs, ys, vs, cols


def _pinhole_rays(heading: float, fov: float, h: int, w: int):
    """Per-pixel ray directions (ego frame: x forward, y left, z up) of a pinhole camera yawed by `heading`, and
    the image-plane row coordinate (sky shading)."""
    f = (w / 2) / math.tan(math.radians(fov) / 2)
    u = (np.arange(w) - w / 2 + 0.5) / f
    v = (np.arange(h) - h / 2 + 0.5) / f
    uu, vv = np.meshgrid(u, v)
    ch, sh = math.cos(math.radians(heading)), math.sin(math.radians(heading))
    return (ch - sh * (-uu), sh + ch * (-uu), -vv), vv


def _shade_ground(dirs, vv, origin, t: float, ego_speed: float, control: bool, dash=(3.0, 9.0)):
    """Sky, asphalt, grass and lane markings seen along `dirs` from `origin` (ego frame, metres)."""
    dx, dy, dz = dirs
    ox, oy, oz = origin
    h, w = dx.shape
    img = np.zeros((h, w, 3), np.float32)
    ground = dz < -1e-3
    tt = np.where(ground, oz / np.maximum(-dz, 1e-3), 0.0)
    gx, gy = dx * tt + ox, dy * tt + oy  # ground hit point (masked by `ground` below)
    dist = np.where(ground, np.sqrt(gx ** 2 + gy ** 2), np.inf)
    if not control:
        img[:] = np.stack([0.45 + 0.3 * (1 + vv.clip(-1, 1)) / 2] * 2 + [0.85 + 0 * vv], -1)  # sky
        asphalt = 0.32 + 0.04 * np.sin(gx * 3.1 + ego_speed * t * 3.1) * np.cos(gy * 2.3)
        road = ground & (np.abs(gy) < 9)
        img[road] = asphalt[road, None] * np.array([1.0, 1.0, 1.05])
        img[ground & ~road] = np.array([0.25, 0.42, 0.2]) * (1 - np.exp(-dist[ground & ~road] / 80))[:, None]
    for k, y0 in enumerate(LANES):
        dashed = (k in (1, 2))
        on = ground & (np.abs(gy - y0) < 0.12) & (dist < 80)
        if dashed:
            on &= np.mod(gx + ego_speed * t, dash[1]) < dash[0]
        img[on] = (np.array([0.1, 0.9, 0.9]) if control else np.array([0.92, 0.92, 0.85])) if dashed else \
            (np.array([0.95, 0.85, 0.1]) if control else np.array([0.95, 0.95, 0.9]))
    return img


def _render(heading: float, fov: float, h: int, w: int, t: float, ego_speed: float, cars, control: bool):
    dirs, vv = _pinhole_rays(heading, fov, h, w)
    img = _shade_ground(dirs, vv, (0.0, 0.0, CAM_HEIGHT), t, ego_speed, control)
    ch, sh = math.cos(math.radians(heading)), math.sin(math.radians(heading))
    f = (w / 2) / math.tan(math.radians(fov) / 2)
    xs, ys, vs, cols = cars
    order = np.argsort(-np.hypot(xs + vs * t, ys))  # far to near
    for i in order:
        cx, cy = xs[i] + vs[i] * t, ys[i]
        # camera-frame depth and image position of the box centre
        fwd = cx * ch + cy * sh
        lat = -cx * sh + cy * ch
        if fwd < 1.0:
            continue
        px, py = w / 2 - f * lat / fwd, h / 2 + f * (CAM_HEIGHT - 0.8) / fwd
        bw, bh = f * 1.9 / fwd, f * 1.5 / fwd
        x0, x1 = int(max(px - bw / 2, 0)), int(min(px + bw / 2, w))
        y0, y1 = int(max(py - bh / 2, 0)), int(min(py + bh / 2, h))
        if x1 <= x0 or y1 <= y0:
            continue
        if control:
            col = np.array([1.0, 0.2, 0.2])
            lw = max(1, int(bw / 20))
            img[y0:y1, x0:x0 + lw] = col
            img[y0:y1, x1 - lw:x1] = col
            img[y0:y0 + lw, x0:x1] = col
            img[y1 - lw:y1, x0:x1] = col
        else:
            shade = np.linspace(1.0, 0.7, y1 - y0)[:, None, None]
            img[y0:y1, x0:x1] = cols[i] / 255.0 * shade
    return (img.clip(0, 1) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------- world-scenario control route
# `--control worldscenario`: the controls are rendered by cosmos_jax.worldscenario (the reference renderer's
# pixels) from a scene built here, through the default f-theta rig; the RGB views are ray-cast through the same
# cameras so both line up. Long-dashed lines are 3 m on / 9 m off as the reference draws them.
CAR_LWH = (4.5, 1.9, 1.5)
ROAD_X = (-120.0, 600.0)


def _ws_scene(cameras, cars, ego_speed: float, frames: int, fps: float):
    from cosmos_jax.worldscenario import rig, scene as ws

    ts = np.round(np.arange(frames) * 1e6 / fps).astype(np.int64)
    ego = np.tile(np.eye(4), (frames, 1, 1))
    ego[:, 0, 3] = ego_speed * ts / 1e6
    road = np.array([[ROAD_X[0], 0, 0], [ROAD_X[1], 0, 0]], np.float64)
    lines = [ws.Laneline(f"lane{k}", road + [0, y0, 0], "WHITE",
                         "LONG_DASHED_SINGLE" if k in (1, 2) else "SOLID_SINGLE") for k, y0 in enumerate(LANES)]
    xs, ys, vs, _ = cars
    tracks = {}
    for i in range(len(xs)):
        centers = np.stack([xs[i] + (vs[i] + ego_speed) * ts / 1e6, np.full(frames, ys[i]),
                            np.full(frames, CAR_LWH[2] / 2)], axis=1)
        tracks[f"car{i:02d}"] = ws.Track(f"car{i:02d}", "Automobile", True, ts, centers,
                                         np.tile(CAR_LWH, (frames, 1)), np.tile(np.eye(3), (frames, 1, 1)))
    return ws.Scene("synthetic", ts, ego, rig.default_rig(cameras), lanelines=lines, tracks=tracks,
                    road_boundaries=[ws.Polyline(f"edge{s}", road + [0, s * 9.0, 0]) for s in (-1, 1)],
                    source_fps=fps)


def _ws_rgb(cam, cam_to_ego, h: int, w: int, t: float, ego_speed: float, cars):
    """RGB view through an f-theta camera: shaded ground along its pixel rays, cars as shaded rectangles."""
    from cosmos_jax.worldscenario import geometry, transforms
    from cosmos_jax.worldscenario.ftheta import project

    uu, vv = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    rays = cam.pixel_to_ray(np.stack([uu, vv], -1)) @ cam_to_ego[:3, :3].T
    dirs = (rays[..., 0], rays[..., 1], rays[..., 2])
    img = _shade_ground(dirs, -rays[..., 2], cam_to_ego[:3, 3], t, ego_speed, False, dash=(3.0, 12.0))
    xs, ys, vs, cols = cars
    for i in np.argsort(-np.hypot(xs + vs * t, ys)):  # far to near
        center = np.array([xs[i] + vs[i] * t, ys[i], CAR_LWH[2] / 2])
        corners = geometry.cuboid_corners(CAR_LWH, transforms.pose_matrix(np.eye(3), center))
        uvd = project(cam, corners, cam_to_ego)
        if np.any(uvd[:, 2] < 0.5):
            continue
        x0, x1 = int(max(uvd[:, 0].min(), 0)), int(min(uvd[:, 0].max(), w))
        y0, y1 = int(max(uvd[:, 1].min(), 0)), int(min(uvd[:, 1].max(), h))
        if x1 > x0 and y1 > y0:
            img[y0:y1, x0:x1] = cols[i] / 255.0 * np.linspace(1.0, 0.7, y1 - y0)[:, None, None]
    return (img.clip(0, 1) * 255).astype(np.uint8)


def _ws_clips(cameras, cars, ego_speed: float, frames: int, fps: float, height: int, width: int):
    """{camera: (rgb (T,H,W,3), control (T,H,W,3))} with controls from the world-scenario renderer."""
    from cosmos_jax.worldscenario import render

    scene = _ws_scene(cameras, cars, ego_speed, frames, fps)
    opts = render.RenderOptions(height=height, width=width, line_scale=width / render.RESOLUTION[1])
    static = render.prepare_static(scene, opts.compat)
    times = scene.timestamps.astype(np.float64)
    out = {}
    for name in cameras:
        cam = render.camera_model(scene, name, opts)
        control = render.render_camera(scene, name, times, static, opts)
        c2e = scene.cameras[name].camera_to_vehicle
        rgb = np.stack([_ws_rgb(cam, c2e, height, width, i / fps, ego_speed, cars) for i in range(frames)])
        out[name] = (rgb, control)
    return out


def make_dataset(root: str, *, samples: int = 2, frames: int = 33, height: int = 176, width: int = 320,
                 fps: float = 10.0, seed: int = 0, cameras=cams.CAMERAS, crf: int = 28,
                 control: str = "synthetic") -> list[str]:
    """Write `samples` samples under `root`; returns their names. `control`: "synthetic" (flat-colour pinhole
    renders, fast) or "worldscenario" (cosmos_jax.worldscenario's reference-faithful HDMap renders through the
    default f-theta rig, RGB ray-cast through the same cameras)."""
    if control not in CONTROL_ROUTES:
        raise ValueError(f"control must be one of {CONTROL_ROUTES}, got {control!r}")
    names = []
    for s in range(samples):
        rng = np.random.default_rng(seed + s)
        name = f"synthetic_{seed + s:04d}"
        cars = _scene(rng)
        ego = float(rng.uniform(5, 12))
        if control == "worldscenario":
            clips = _ws_clips(cameras, cars, ego, frames, fps, height, width)
        for cam in cameras:
            for kind, is_control in (("videos", False), ("control_input_hdmap_bbox", True)):
                if control == "worldscenario":
                    clip = clips[cam][int(is_control)]
                else:
                    heading, fov = RIG[cam]
                    clip = np.stack([_render(heading, fov, height, width, i / fps, ego, cars, is_control)
                                     for i in range(frames)])
                folder = os.path.join(root, kind, f"ftheta_{cam}")
                os.makedirs(folder, exist_ok=True)
                video.write_video(os.path.join(folder, f"{name}.mp4"), clip, fps, crf=crf)
        cap_dir = os.path.join(root, "captions", f"ftheta_{cams.CAPTION_CAMERA}")
        os.makedirs(cap_dir, exist_ok=True)
        lanes = "four" if len(LANES) == 4 else str(len(LANES))
        caption = (f"A synthetic daytime drive on a straight road with {lanes} lane markings. The ego car moves at "
                   f"{ego:.0f} m/s while {len(cars[0])} other cars drive in the neighbouring lanes under a clear sky.")
        with open(os.path.join(cap_dir, f"{name}.json"), "w") as fh:
            json.dump({"caption": caption}, fh)
        names.append(name)
    return names


def main(argv=None):
    ap = cli_lib.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--height", type=int, default=176)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crf", type=int, default=28)
    ap.add_argument("--control", choices=CONTROL_ROUTES, default="synthetic",
                    help="synthetic: flat-colour pinhole HDMap renders (fast, the default); worldscenario: the "
                         "reference-faithful renderer (cosmos_jax.worldscenario) through the default f-theta rig, "
                         "RGB views ray-cast through the same cameras (slower: ~0.1-0.5 s per camera-frame)")
    args = ap.parse_args(argv)
    names = make_dataset(args.root, samples=args.samples, frames=args.frames, height=args.height, width=args.width,
                         fps=args.fps, seed=args.seed, crf=args.crf, control=args.control)
    print(f"wrote {len(names)} samples x {len(cams.CAMERAS)} cameras to {args.root}")


def cli() -> None:
    """`python tools/make_sample_dataset.py` entry point: bad input is one line (cosmos_jax/cli.py)."""
    cli_lib.entry(main)


if __name__ == "__main__":
    cli()
