"""Scene dataclasses: what one clip holds for rendering (world frame, metres, microseconds).

Spec: `docs/control_videos.md` §1.5 (RDS-HQ content), §1.6 (frames, object poses per timestamp), §2.5 (camera
poses). The world is the clip's own frame (FLU for RDS-HQ, not re-centred). Arrays are float64 here; the loader
keeps the reference's float32 rounding where it changes which samples a pattern keeps (§3.5).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cosmos_jax.worldscenario import transforms


class SceneError(ValueError):
    """A clip the renderer cannot use; the message names the file or element."""


@dataclasses.dataclass(frozen=True)
class Polyline:
    """An open 3D polyline (road boundary, wait line, pole, lane rail)."""

    name: str
    points: np.ndarray  # (N, 3)


@dataclasses.dataclass(frozen=True)
class Laneline:
    """A laneline with its enum colour and style (§3.5), e.g. ("WHITE", "SHORT_DASHED_SINGLE")."""

    name: str
    points: np.ndarray  # (N, 3)
    color: str = "WHITE"
    style: str = "SOLID_SINGLE"


@dataclasses.dataclass(frozen=True)
class Polygon:
    """A surface polygon (crosswalk, road marking), vertices in order, not repeated at the end."""

    name: str
    vertices: np.ndarray  # (N, 3)


@dataclasses.dataclass(frozen=True)
class Cuboid:
    """An oriented box: centre, (length, width, height) along its local x (heading), y, z, and rotation."""

    name: str
    center: np.ndarray  # (3,)
    dims: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3) local -> world

    def transform(self) -> np.ndarray:
        return transforms.pose_matrix(self.rotation, self.center)


@dataclasses.dataclass(frozen=True)
class TrafficLight:
    """A traffic-light cuboid and its state per source frame ("red", "yellow", "green", "unknown", "off")."""

    box: Cuboid
    states: tuple[str, ...] = ()
    feature_id: str | None = None

    def state_at(self, frame: int) -> str:
        return self.states[frame] if 0 <= frame < len(self.states) else "unknown"


@dataclasses.dataclass(frozen=True)
class Track:
    """A dynamic object's observations (§1.6): keyframe timestamps, centres, dims, rotations; raw type string."""

    track_id: str
    raw_type: str
    is_moving: bool
    timestamps: np.ndarray  # (N,) int64 us, increasing
    centers: np.ndarray  # (N, 3)
    dims: np.ndarray  # (N, 3)
    rotations: np.ndarray  # (N, 3, 3)

    def pose_at(self, t_us: float):
        """(centre, dims, rotation) at a timestamp: linear centre/dims, SLERP rotation between keyframes; None
        outside the observed range (the RDS-HQ loader extrapolates 0 us, §1.6)."""
        ts = self.timestamps
        if len(ts) == 0 or t_us < ts[0] or t_us > ts[-1]:
            return None
        if len(ts) == 1:
            return self.centers[0], self.dims[0], self.rotations[0]
        i = int(np.clip(np.searchsorted(ts, t_us), 1, len(ts) - 1))
        t0, t1 = float(ts[i - 1]), float(ts[i])
        alpha = (t_us - t0) / (t1 - t0) if t1 != t0 else 0.0
        center = (1 - alpha) * self.centers[i - 1] + alpha * self.centers[i]
        dims = (1 - alpha) * self.dims[i - 1] + alpha * self.dims[i]
        q = transforms.quat_from_matrix(self.rotations[[i - 1, i]])
        rot = transforms.matrix_from_quat(transforms.slerp(q[0], q[1], alpha))
        return center, dims, rot


@dataclasses.dataclass(frozen=True)
class CameraRig:
    """One camera: f-theta intrinsics vector at its native resolution (§2.1) and its camera-to-vehicle pose
    (OpenCV camera axes to the FLU vehicle frame)."""

    name: str
    intrinsics: np.ndarray  # (11,) or (14,)
    camera_to_vehicle: np.ndarray  # (4, 4)


@dataclasses.dataclass
class Scene:
    """Everything one clip renders from. Camera poses come from `ego_poses @ camera_to_vehicle` or, when the clip
    has no vehicle poses, from `camera_poses` directly (§1.5, PR #139)."""

    clip_id: str
    timestamps: np.ndarray  # (T,) int64 us of the source frames
    ego_poses: np.ndarray | None  # (T, 4, 4) vehicle-to-world, or None
    cameras: dict[str, CameraRig]
    camera_poses: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # name -> (T, 4, 4) cam-to-world
    lanelines: list[Laneline] = dataclasses.field(default_factory=list)
    lanes: list[Polyline] = dataclasses.field(default_factory=list)  # loaded, never drawn (§3.4)
    road_boundaries: list[Polyline] = dataclasses.field(default_factory=list)
    wait_lines: list[Polyline] = dataclasses.field(default_factory=list)
    poles: list[Polyline] = dataclasses.field(default_factory=list)
    crosswalks: list[Polygon] = dataclasses.field(default_factory=list)
    road_markings: list[Polygon] = dataclasses.field(default_factory=list)
    traffic_signs: list[Cuboid] = dataclasses.field(default_factory=list)
    traffic_lights: list[TrafficLight] = dataclasses.field(default_factory=list)
    tracks: dict[str, Track] = dataclasses.field(default_factory=dict)
    source_fps: float = 30.0

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    def camera_to_world(self, camera: str, at_us: np.ndarray) -> np.ndarray:
        """(len(at), 4, 4) camera-to-world poses at output timestamps (interpolated between source frames)."""
        if camera not in self.cameras:
            raise SceneError(f"camera {camera!r} is not in the rig (has: {', '.join(sorted(self.cameras))})")
        if self.ego_poses is None:
            if camera not in self.camera_poses:
                raise SceneError(f"no poses for camera {camera!r} (no vehicle_pose and no pose.{camera} entries)")
            return transforms.interpolate_poses(self.timestamps, self.camera_poses[camera], at_us)
        ego = transforms.interpolate_poses(self.timestamps, self.ego_poses, at_us)
        return ego @ self.cameras[camera].camera_to_vehicle

    def light_frame(self, t_us: float) -> int:
        """Source frame whose traffic-light state applies at a timestamp (nearest)."""
        return int(np.argmin(np.abs(self.timestamps - t_us))) if len(self.timestamps) else 0

    def objects_at(self, t_us: float) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
        """[(track_id, raw_type, centre, dims, rotation)] of the tracks alive at a timestamp, sorted by id (§3.8)."""
        out = []
        for tid in sorted(self.tracks):
            tr = self.tracks[tid]
            pose = tr.pose_at(t_us)
            if pose is not None:
                out.append((tid, tr.raw_type, *pose))
        return out
