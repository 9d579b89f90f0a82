"""The shipped default 7-camera rig: the reference's default f-theta intrinsics plus nominal extrinsics.

Spec: `docs/control_videos.md` §1.1 (camera names and order), §2.6 (default intrinsics, shipped by the reference as
`dataloaders/default_ftheta_intrinsic.tar`, 1920x1080 sensors, used when a clip has no `ftheta_intrinsic/`).
The reference ships no extrinsics; the ones below are *nominal* (not an NVIDIA calibration): the rig of the
control-render oracle (`tests/fixtures/control_render/caseA`), camera position in the FLU vehicle frame (m) and
yaw (left positive) / pitch down / roll (degrees), see `transforms.euler_to_camera_rotation`.
"""

from __future__ import annotations

import numpy as np

from cosmos_jax.worldscenario import transforms
from cosmos_jax.worldscenario.scene import CameraRig

# reference DEFAULT_CAMERA_NAMES order (rendering/config.py)
DEFAULT_CAMERAS: tuple[str, ...] = (
    "camera_front_wide_120fov",
    "camera_front_tele_30fov",
    "camera_cross_right_120fov",
    "camera_cross_left_120fov",
    "camera_rear_left_70fov",
    "camera_rear_right_70fov",
    "camera_rear_tele_30fov",
)

# name: (intrinsics [cx, cy, W, H, p0..p5, is_bw_poly], position FLU m, (yaw, pitch down, roll) deg)
DEFAULT_RIG: dict[str, tuple[list[float], tuple[float, float, float], tuple[float, float, float]]] = {
    "camera_front_wide_120fov": (
        [954.2063, 757.15415, 1920.0, 1080.0, 0.0, 0.00105758628, 8.2116208e-09, -3.3945008e-11, 8.0734208e-14,
         -2.94602496e-17, 1.0],
        (1.75, 0.0, 1.45), (0.0, 1.5, 0.3)),
    "camera_front_tele_30fov": (
        [978.44415, 597.66565, 1920.0, 1080.0, 0.0, 3675.74975, 178.78496, -387.41287, -11.4377625, 18.0317115, 0.0],
        (1.75, 0.12, 1.45), (-0.6, 0.4, 0.0)),
    "camera_cross_right_120fov": (
        [958.4103, 744.29785, 1920.0, 1080.0, 0.0, 0.0010670406, -1.9016488e-09, 5.0939608e-12, 3.09046848e-14,
         -6.74121728e-18, 1.0],
        (2.1, -0.95, 0.95), (-62.0, 4.0, 0.0)),
    "camera_cross_left_120fov": (
        [964.86275, 744.439, 1920.0, 1080.0, 0.0, 0.0010655136, -6.3100036e-09, 1.9566128e-11, 1.258088896e-14,
         1.28343936e-18, 1.0],
        (2.1, 0.95, 0.95), (62.0, 4.0, 0.0)),
    "camera_rear_left_70fov": (
        [933.82935, 557.2074, 1920.0, 1080.0, 0.0, 1571.27855, 96.98752, -255.40837, 150.845965, 97.98543, 0.0],
        (1.1, 1.0, 1.1), (145.0, 5.0, 0.0)),
    "camera_rear_right_70fov": (
        [968.8991, 553.86615, 1920.0, 1080.0, 0.0, 1564.0829, 100.93601, -264.07915, 149.67691, 100.501725, 0.0],
        (1.1, -1.0, 1.1), (-145.0, 5.0, 0.0)),
    "camera_rear_tele_30fov": (
        [1032.4529, 514.0706, 1920.0, 1080.0, 0.0, 3680.57665, -184.34178, 2877.95335, -12169.1035, 16158.127, 0.0],
        (-0.9, 0.0, 1.55), (180.0, 1.0, 0.0)),
}


def default_intrinsics(camera: str) -> np.ndarray:
    """The reference's default f-theta intrinsics vector of a camera (§2.6)."""
    return np.array(DEFAULT_RIG[camera][0], np.float64)


def nominal_camera_to_vehicle(camera: str) -> np.ndarray:
    """4x4 nominal camera-to-vehicle pose (OpenCV camera -> FLU vehicle)."""
    _, position, (yaw, pitch, roll) = DEFAULT_RIG[camera]
    return transforms.pose_matrix(transforms.euler_to_camera_rotation(yaw, pitch, roll), np.array(position))


def default_rig(cameras=DEFAULT_CAMERAS) -> dict[str, CameraRig]:
    """CameraRig per camera name of the default rig."""
    unknown = [c for c in cameras if c not in DEFAULT_RIG]
    if unknown:
        raise KeyError(f"not in the default rig: {', '.join(unknown)} (has: {', '.join(DEFAULT_CAMERAS)})")
    return {c: CameraRig(c, default_intrinsics(c), nominal_camera_to_vehicle(c)) for c in cameras}
