"""Loader for one clip in the RDS-HQ layout (Cosmos-Drive-Dreams WebDataset tars) -> `scene.Scene`.

Spec: `docs/control_videos.md` §1.5 (files and fields), §1.6 (frame timestamps round(i * 1e6 / 30), objects
interpolated per timestamp, static objects averaged), §3.5 (laneline colour/style = the most common pair).
`<root>/<attr>/<clip>.tar` holds members `<clip>.<key>`; like `WebDataset(...).decode()` the loader reads the first
sample of the tar (members sharing the first member's key) and decodes `.npy` and `.json` members.

Problems name the file and element: a missing pose / camera / unreadable tar is a `SceneError`; a broken element
(NaN coordinates, too few points, a degenerate cuboid, an unknown light state) is dropped or repaired with a
logged warning, never a crash later in the renderer.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter

import numpy as np

from cosmos_jax.worldscenario import geometry, palette, rig, transforms
from cosmos_jax.worldscenario.scene import (CameraRig, Cuboid, Laneline, Polygon, Polyline, Scene, SceneError,
                                            TrafficLight, Track)

log = logging.getLogger("cosmos_jax.worldscenario")

POSE_FPS = 30.0  # RDS-HQ poses and labels are 30 fps (INPUT_POSE_FPS)
STATIC_HEADING_THRESHOLD = 0.7  # data_utils.fix_static_objects
_ATTRS = ("pose", "vehicle_pose", "all_object_info", "3d_lanelines", "3d_lanes", "3d_road_boundaries",
          "ftheta_intrinsic")


def is_rdshq(root: str) -> bool:
    """Detection as the reference's `can_load` (§1.3): a pose folder and at least one label/intrinsics folder."""
    has = {a for a in _ATTRS if os.path.isdir(os.path.join(root, a))}
    return bool(has & {"pose", "vehicle_pose"}) and bool(has - {"pose", "vehicle_pose"})


def detect_clip_id(root: str) -> str:
    """The clip id = the stem of the tar in `pose/` (else `vehicle_pose/`); several clips need an explicit id."""
    for attr in ("pose", "vehicle_pose"):
        folder = os.path.join(root, attr)
        if os.path.isdir(folder):
            tars = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".tar"))
            if len(tars) == 1:
                return tars[0]
            if len(tars) > 1:
                raise SceneError(f"{folder}: holds {len(tars)} clips ({', '.join(tars[:3])}, ...); pass --clip-id")
            raise SceneError(f"{folder}: no .tar file")
    raise SceneError(f"{root}: not an RDS-HQ clip (no pose/ or vehicle_pose/ folder)")


def read_sample(path: str) -> dict:
    """First WebDataset sample of a tar: {key suffix: decoded value} (`.npy` -> array, `.json` -> object)."""
    try:
        tf = tarfile.open(path)
    except (OSError, tarfile.TarError) as e:
        raise SceneError(f"{path}: not a readable tar ({e})") from e
    out, key = {}, None
    with tf:
        for member in tf:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if "." not in base:
                continue
            prefix = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
            suffix = base.split(".", 1)[1].lower()
            if key is None:
                key = prefix
            elif prefix != key:
                break
            data = tf.extractfile(member).read()
            try:
                if suffix.endswith(".npy") or suffix == "npy":
                    out[suffix] = np.load(io.BytesIO(data), allow_pickle=False)
                elif suffix.endswith(".json") or suffix == "json":
                    out[suffix] = json.loads(data)
                else:
                    out[suffix] = data
            except (ValueError, OSError) as e:
                raise SceneError(f"{path}: member {member.name} cannot be decoded ({e})") from e
    return out


def _tar(root: str, attr: str, clip: str) -> str:
    return os.path.join(root, attr, f"{clip}.tar")


def _frame_time(index: int) -> int:
    return round(index * 1_000_000 / POSE_FPS)


def _pose_matrix(value, where: str) -> np.ndarray:
    m = np.asarray(value, np.float64)
    if m.shape != (4, 4):
        raise SceneError(f"{where}: expected a 4x4 pose, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise SceneError(f"{where}: pose contains NaN/inf")
    return m


def _vertices(raw, where: str, min_points: int) -> np.ndarray | None:
    """(N, 3) array from [[x,y,z],...] or [{x,y,z},...]; NaN rows dropped with a warning; None if too few left."""
    if not raw:
        return None
    try:
        if isinstance(raw[0], dict):
            pts = np.array([[v["x"], v["y"], v["z"]] for v in raw], np.float64)
        else:
            pts = np.array(raw, np.float64)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("%s: unreadable vertices (%s), skipped", where, e)
        return None
    if pts.ndim != 2 or pts.shape[1] != 3:
        log.warning("%s: vertices must be (N, 3), got %s, skipped", where, pts.shape)
        return None
    bad = ~np.all(np.isfinite(pts), axis=1)
    if bad.any():
        log.warning("%s: dropped %d vertex row(s) with NaN/inf", where, int(bad.sum()))
        pts = pts[~bad]
    if len(pts) < min_points:
        log.warning("%s: %d valid vertices, needs %d; skipped", where, len(pts), min_points)
        return None
    return pts


def _labels(root: str, attr: str, clip: str, keys: tuple[str, ...]):
    path = _tar(root, attr, clip)
    if not os.path.isfile(path):
        return path, []
    sample = read_sample(path)
    for k in keys:
        if k in sample and isinstance(sample[k], dict):
            return path, sample[k].get("labels", []) or []
    log.warning("%s: none of %s inside, skipped", path, ", ".join(keys))
    return path, []


def _shape(label: dict) -> dict | None:
    data = label.get("labelData", {}) or {}
    if data.get("emptyLabel", False):
        return None
    return data.get("shape3d", {}) or {}


# ---------------------------------------------------------------------------------------------------- map elements
def _label_vertices(root: str, attr: str, clip: str, json_key: str, shape_key: str, min_points: int):
    """(label index, shape, vertices) of every usable label whose shape holds `shape_key` vertices (empty
    labels and labels with too few valid vertices are skipped, the latter with a warning naming them)."""
    path, labels = _labels(root, attr, clip, (json_key,))
    for i, label in enumerate(labels):
        shape = _shape(label)
        if shape is None:
            continue
        pts = _vertices(shape.get(shape_key, {}).get("vertices", []), f"{path} label {i}", min_points)
        if pts is not None:
            yield i, shape, pts


def load_polylines(root: str, attr: str, clip: str, json_key: str) -> list[Polyline]:
    """`polyline3d` labels (road boundaries, wait lines, poles)."""
    return [Polyline(f"{attr}[{i}]", pts)
            for i, _, pts in _label_vertices(root, attr, clip, json_key, "polyline3d", 2)]


def _most_common_type(shape: dict) -> tuple[str, str]:
    """(color, style) enums: the most frequent (colors[k], styles[k]) pair; default WHITE SOLID_SINGLE (§3.5)."""
    lists = {}
    for attr in shape.get("attributes", []) or []:
        if attr.get("name") in ("colors", "styles"):
            lists[attr["name"]] = (attr.get("enumsList", {}) or {}).get("enumsList", []) or []
    color, style = "WHITE", "SOLID_SINGLE"
    if lists.get("colors") and lists.get("styles"):
        c, s = Counter(zip(lists["colors"], lists["styles"])).most_common(1)[0][0]
        if c:
            color = c.upper() if c.upper() in palette.LANELINE_COLOR_ENUM else "UNKNOWN"
        if s:
            style = s.upper() if s.upper() in palette.LANELINE_STYLE_ENUM else "UNKNOWN"
    return color, style


def load_lanelines(root: str, clip: str) -> list[Laneline]:
    return [Laneline(f"3d_lanelines[{i}]", pts, *_most_common_type(shape))
            for i, shape, pts in _label_vertices(root, "3d_lanelines", clip, "lanelines.json", "polyline3d", 2)]


def load_lanes(root: str, clip: str) -> list[Polyline]:
    path, labels = _labels(root, "3d_lanes", clip, ("lanes.json",))
    out = []
    for i, label in enumerate(labels):
        shape = _shape(label) if label.get("labelData") else None
        for j, line in enumerate(((shape or {}).get("polylines3d", {}) or {}).get("polylines", []) or []):
            pts = _vertices(line.get("vertices", []), f"{path} label {i} rail {j}", 2)
            if pts is not None:
                out.append(Polyline(f"3d_lanes[{i}][{j}]", pts))
    return out


def load_polygons(root: str, attr: str, clip: str, json_key: str) -> list[Polygon]:
    """`surface` labels (crosswalks, road markings)."""
    return [Polygon(f"{attr}[{i}]", pts) for i, _, pts in _label_vertices(root, attr, clip, json_key, "surface", 3)]


def _cuboids(root: str, attr: str, clip: str, keys: tuple[str, ...]):
    path, labels = _labels(root, attr, clip, keys)
    for i, label in enumerate(labels):
        shape = _shape(label)
        if shape is None:
            continue
        where = f"{path} label {i}"
        corners = _vertices(shape.get("cuboid3d", {}).get("vertices", []), where, 8)
        if corners is None:
            continue
        if len(corners) != 8:
            log.warning("%s: a cuboid needs 8 corners, has %d; skipped", where, len(corners))
            continue
        try:
            center, dims, rot = geometry.cuboid_from_corners(corners)
        except geometry.DegenerateGeometry as e:
            log.warning("%s: %s; skipped", where, e)
            continue
        box = Cuboid(f"{attr}[{i}]", center, dims, transforms.orthonormalize(rot))
        yield i, shape, box


def load_traffic_signs(root: str, clip: str) -> list[Cuboid]:
    return [box for _, _, box in _cuboids(root, "3d_traffic_signs", clip,
                                          ("3d_traffic_signs.json", "traffic_signs.json"))]


def _light_states(root: str, clip: str) -> dict[str, list]:
    path = _tar(root, "3d_traffic_lights_status", clip)
    if not os.path.isfile(path):
        return {}
    sample = read_sample(path)
    data = sample.get("aggregated_states.json")
    if not isinstance(data, dict):
        log.warning("%s: no aggregated_states.json, lights drawn as unknown", path)
        return {}
    out = {}
    for info in (data.get("traffic_light_states", {}) or {}).values():
        if isinstance(info, dict) and info.get("feature_id") is not None:
            out[str(info["feature_id"])] = list(info.get("state", []) or [])
    return out


def _normalize_state(value, where: str) -> str:
    """Lower-case state; None/empty -> unknown; anything unrecognised -> unknown with a warning (the reference
    raises ValueError)."""
    if value is None:
        return "unknown"
    s = str(getattr(value, "value", value)).strip().lower()
    if not s:
        return "unknown"
    if s not in palette.TRAFFIC_LIGHT_STATES:
        log.warning("%s: unknown traffic light state %r, drawn as unknown", where, value)
        return "unknown"
    return s


def load_traffic_lights(root: str, clip: str, num_frames: int) -> list[TrafficLight]:
    states = _light_states(root, clip)
    out = []
    for i, shape, box in _cuboids(root, "3d_traffic_lights", clip, ("3d_traffic_lights.json", "traffic_lights.json")):
        fid = None
        for attr in shape.get("attributes", []) or []:
            if attr.get("name") == "feature_id" and attr.get("text") is not None:
                fid = str(attr["text"])
                break
        seq = states.get(fid, []) if fid is not None else []
        norm = tuple(_normalize_state(seq[f] if f < len(seq) else None, f"traffic light {fid} frame {f}")
                     for f in range(max(1, num_frames)))
        out.append(TrafficLight(box, norm, fid))
    return out


# ---------------------------------------------------------------------------------------------------- dynamic objects
def _fix_static(track: Track) -> Track:
    """Average a non-moving object's pose and dims over the observations whose heading agrees with the mean
    (data_utils.fix_static_objects, §1.5)."""
    rots = track.rotations
    fronts = rots[:, :, 0] / np.maximum(np.linalg.norm(rots[:, :, 0], axis=1, keepdims=True), 1e-8)
    mean = fronts.mean(axis=0)
    if np.linalg.norm(mean) <= 1e-8:
        return track
    mean /= np.linalg.norm(mean)
    sel = np.nonzero(fronts @ mean > STATIC_HEADING_THRESHOLD)[0]
    if sel.size == 0:
        return track
    center = track.centers[sel].mean(axis=0)
    front = rots[sel][:, :, 0].mean(axis=0)
    up = rots[sel][:, :, 2].mean(axis=0)
    if np.linalg.norm(front) <= 1e-8 or np.linalg.norm(up) <= 1e-8:
        return track
    front, up = front / np.linalg.norm(front), up / np.linalg.norm(up)
    left = np.cross(up, front)
    if np.linalg.norm(left) <= 1e-8:
        return track
    left /= np.linalg.norm(left)
    up = np.cross(front, left)
    up /= max(np.linalg.norm(up), 1e-8)
    rot = transforms.orthonormalize(np.stack([front, left, up], axis=1))
    n = len(track.timestamps)
    return Track(track.track_id, track.raw_type, track.is_moving, track.timestamps, np.repeat(center[None], n, 0),
                 np.repeat(track.dims.mean(axis=0)[None], n, 0), np.repeat(rot[None], n, 0))


def load_tracks(root: str, clip: str) -> dict[str, Track]:
    path = _tar(root, "all_object_info", clip)
    if not os.path.isfile(path):
        return {}
    sample = read_sample(path)
    keys = sorted(k for k in sample if k.endswith(".all_object_info.json"))
    obs: dict[str, dict] = {}
    for key in keys:
        try:
            frame = int(key.split(".")[0])
        except ValueError:
            log.warning("%s: member %s has no frame number, skipped", path, key)
            continue
        objects = sample[key]
        if not isinstance(objects, dict):
            log.warning("%s: %s is not an object map, skipped", path, key)
            continue
        for tid, info in objects.items():
            where = f"{path} frame {frame} object {tid}"
            if not isinstance(info, dict) or "object_to_world" not in info:
                log.warning("%s: no object_to_world, skipped", where)
                continue
            rec = obs.setdefault(str(tid), {"type": info.get("object_type", "Others"),
                                            "moving": bool(info.get("object_is_moving", False)),
                                            "t": [], "pose": [], "lwh": []})
            pose = np.asarray(info["object_to_world"], np.float64)
            lwh = info.get("object_lwh")
            if lwh is None:
                lwh = rec["lwh"][-1] if rec["lwh"] else [2.0, 2.0, 2.0]
            lwh = np.asarray(lwh, np.float64)
            if pose.shape != (4, 4) or lwh.shape != (3,) or not (np.all(np.isfinite(pose))
                                                                 and np.all(np.isfinite(lwh))):
                log.warning("%s: pose/size not finite or malformed, observation skipped", where)
                continue
            rec["t"].append(_frame_time(frame))
            rec["pose"].append(pose)
            rec["lwh"].append(lwh)
    tracks = {}
    for tid, rec in obs.items():
        if not rec["t"]:
            log.warning("%s: object %s has no valid observation, skipped", path, tid)
            continue
        order = np.argsort(rec["t"], kind="stable")
        poses = np.array(rec["pose"])[order]
        track = Track(tid, str(rec["type"]), rec["moving"], np.array(rec["t"], np.int64)[order],
                      poses[:, :3, 3].copy(), np.array(rec["lwh"])[order],
                      transforms.orthonormalize(poses[:, :3, :3]))
        tracks[tid] = track if track.is_moving else _fix_static(track)
    return tracks


# ---------------------------------------------------------------------------------------------------- poses, cameras
def _frames(sample: dict, suffix: str, path: str) -> tuple[list[int], list[str]]:
    keys = sorted(k for k in sample if k.endswith(suffix))
    frames = []
    for k in keys:
        try:
            frames.append(int(k.split(".")[0]))
        except ValueError as e:
            raise SceneError(f"{path}: member {k} has no frame number") from e
    return frames, keys


def load_scene(root: str, cameras: list[str] | None = None, clip_id: str | None = None) -> Scene:
    """Read one RDS-HQ clip; `cameras` (default: the 7 default ones) must all be in the rig."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise SceneError(f"{root}: no such directory")
    if not is_rdshq(root):
        raise SceneError(f"{root}: not an RDS-HQ clip (needs pose/ or vehicle_pose/ and one of "
                         f"all_object_info/, 3d_lanelines/, 3d_lanes/, 3d_road_boundaries/, ftheta_intrinsic/)")
    clip = clip_id or detect_clip_id(root)
    cameras = list(cameras or rig.DEFAULT_CAMERAS)

    vp_path, pose_path = _tar(root, "vehicle_pose", clip), _tar(root, "pose", clip)
    pose_sample = read_sample(pose_path) if os.path.isfile(pose_path) else {}
    ego = None
    cam_poses: dict[str, np.ndarray] = {}
    if os.path.isfile(vp_path):
        vp = read_sample(vp_path)
        frames, keys = _frames(vp, ".vehicle_pose.npy", vp_path)
        if not frames:
            raise SceneError(f"{vp_path}: no <frame>.vehicle_pose.npy members")
        ego = np.stack([_pose_matrix(vp[k], f"{vp_path} member {k}") for k in keys])
    elif pose_sample:
        frames = None
        for cam in cameras:
            f, keys = _frames(pose_sample, f".pose.{cam}.npy", pose_path)
            if keys:
                frames = frames if frames is not None else f
                if f[: len(frames)] != frames:
                    raise SceneError(f"{pose_path}: pose.{cam} has frames {f[0]}..{f[-1]} ({len(f)}), the first "
                                     f"camera {frames[0]}..{frames[-1]} ({len(frames)}); they must match")
                cam_poses[cam] = np.stack([_pose_matrix(pose_sample[k], f"{pose_path} member {k}")
                                           for k in keys])[: len(frames)]
        if not frames:
            raise SceneError(f"{pose_path}: no pose.<camera>.npy members for {', '.join(cameras)}")
    else:
        raise SceneError(f"{root}: no {clip}.tar in vehicle_pose/ or pose/")
    timestamps = np.array([_frame_time(f) for f in frames], np.int64)

    rigs = _load_cameras(root, clip, cameras, pose_sample, pose_path, vp if ego is not None else None, cam_poses)
    scene = Scene(clip, timestamps, ego, rigs, cam_poses, source_fps=POSE_FPS)
    scene.lanelines = load_lanelines(root, clip)
    scene.lanes = load_lanes(root, clip)
    scene.road_boundaries = load_polylines(root, "3d_road_boundaries", clip, "road_boundaries.json")
    scene.crosswalks = load_polygons(root, "3d_crosswalks", clip, "crosswalks.json")
    scene.traffic_lights = load_traffic_lights(root, clip, len(timestamps))
    scene.traffic_signs = load_traffic_signs(root, clip)
    scene.poles = load_polylines(root, "3d_poles", clip, "poles.json")
    scene.wait_lines = load_polylines(root, "3d_wait_lines", clip, "wait_lines.json")
    scene.road_markings = load_polygons(root, "3d_road_markings", clip, "road_markings.json")
    scene.tracks = load_tracks(root, clip)
    return scene


def _load_cameras(root, clip, cameras, pose_sample, pose_path, vehicle_sample, cam_poses) -> dict[str, CameraRig]:
    """Intrinsics from `ftheta_intrinsic/` (else the shipped defaults); extrinsic camera->vehicle =
    inv(vehicle_pose[first]) @ pose.<cam>[first] (§1.5)."""
    ip = _tar(root, "ftheta_intrinsic", clip)
    if os.path.isfile(ip):
        intr, source = read_sample(ip), ip
    else:
        intr = {f"ftheta_intrinsic.{c}.npy": rig.default_intrinsics(c) for c in rig.DEFAULT_CAMERAS}
        source = "the default intrinsics (no ftheta_intrinsic/ tar)"
        log.warning("%s: missing, using the reference's default f-theta intrinsics", ip)
    have = sorted(k[len("ftheta_intrinsic."):-4] for k in intr if k.startswith("ftheta_intrinsic.") and
                  k.endswith(".npy"))
    out = {}
    for cam in cameras:
        key = f"ftheta_intrinsic.{cam}.npy"
        if key not in intr:
            hint = " (camera names use underscores, e.g. camera_front_wide_120fov)" if ":" in cam else ""
            raise SceneError(f"camera {cam} is not in the rig: {source} has {', '.join(have) or 'no camera'}{hint}")
        vec = np.asarray(intr[key], np.float64).reshape(-1)
        if vec.size not in (11, 14) or not np.all(np.isfinite(vec)):
            raise SceneError(f"{source}: {key} must be 11 or 14 finite numbers, got {vec.size} ({vec[:4]}...)")
        extr = np.eye(4)
        if vehicle_sample is not None:
            _, keys = _frames(pose_sample, f".pose.{cam}.npy", pose_path)
            if keys:
                frame_token = keys[0].split(".")[0]
                vkey = f"{frame_token}.vehicle_pose.npy"
                cam_to_world = _pose_matrix(pose_sample[keys[0]], f"{pose_path} member {keys[0]}")
                if vkey in vehicle_sample:
                    extr = np.linalg.inv(_pose_matrix(vehicle_sample[vkey], vkey)) @ cam_to_world
                else:
                    log.warning("%s: no vehicle pose for frame %s, camera %s extrinsics from the default rig",
                                pose_path, frame_token, cam)
                    extr = _nominal(cam)
            else:
                log.warning("%s: no pose.%s entries, extrinsics from the default rig (the reference uses identity)",
                            pose_path, cam)
                extr = _nominal(cam)
        elif cam not in cam_poses:
            raise SceneError(f"{pose_path}: no pose.{cam}.npy members and no vehicle_pose/ to place camera {cam}")
        out[cam] = CameraRig(cam, vec, extr)
    return out


def _nominal(cam: str) -> np.ndarray:
    if cam in rig.DEFAULT_RIG:
        return rig.nominal_camera_to_vehicle(cam)
    raise SceneError(f"camera {cam}: no pose entries to derive its extrinsics and not a default-rig camera")
