"""Rigid transforms: rotation matrix <-> quaternion (x, y, z, w), SLERP, pose interpolation, rig extrinsics.

Spec: `docs/control_videos.md` §1.6 (SLERP of orientations between keyframes), §2.5 (poses), §1.5 (extrinsic =
inv(vehicle_pose[first]) @ pose[first]).
"""

from __future__ import annotations

import numpy as np


def quat_from_matrix(rot: np.ndarray) -> np.ndarray:
    """Unit quaternions (..., 4) as (x, y, z, w), w >= 0, of rotation matrices (..., 3, 3) (Shepperd's method)."""
    m = np.asarray(rot, np.float64)
    batch = m.shape[:-2]
    m = m.reshape(-1, 3, 3)
    tr = np.trace(m, axis1=1, axis2=2)
    cand = np.stack([m[:, 0, 0], m[:, 1, 1], m[:, 2, 2], tr], axis=1)
    best = np.argmax(cand, axis=1)
    q = np.empty((len(m), 4))
    for i in range(3):  # a diagonal element is the largest
        sel = best == i
        j, k = (i + 1) % 3, (i + 2) % 3
        mm = m[sel]
        qi = np.sqrt(np.maximum(1.0 + 2.0 * mm[:, i, i] - tr[sel], 0.0)) * 0.5
        q[sel, i] = qi
        q[sel, j] = (mm[:, j, i] + mm[:, i, j]) / (4 * qi)
        q[sel, k] = (mm[:, k, i] + mm[:, i, k]) / (4 * qi)
        q[sel, 3] = (mm[:, k, j] - mm[:, j, k]) / (4 * qi)
    sel = best == 3
    mm = m[sel]
    qw = np.sqrt(np.maximum(1.0 + tr[sel], 0.0)) * 0.5
    q[sel, 3] = qw
    q[sel, 0] = (mm[:, 2, 1] - mm[:, 1, 2]) / (4 * qw)
    q[sel, 1] = (mm[:, 0, 2] - mm[:, 2, 0]) / (4 * qw)
    q[sel, 2] = (mm[:, 1, 0] - mm[:, 0, 1]) / (4 * qw)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q *= np.where(q[:, 3:4] < 0, -1.0, 1.0)
    return q.reshape(*batch, 4)


def matrix_from_quat(quat: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of quaternions (..., 4) (x, y, z, w), normalised first."""
    q = np.asarray(quat, np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def orthonormalize(rot: np.ndarray) -> np.ndarray:
    """The rotation a matrix stands for (through its quaternion, as the reference's loaders do)."""
    return matrix_from_quat(quat_from_matrix(rot))


def slerp(q0: np.ndarray, q1: np.ndarray, alpha: float) -> np.ndarray:
    """Spherical linear interpolation of two unit quaternions (shortest arc)."""
    q0, q1 = np.asarray(q0, np.float64), np.asarray(q1, np.float64)
    dot = float(np.dot(q0, q1))
    if dot < 0:
        q1, dot = -q1, -dot
    if dot > 1.0 - 1e-12:
        q = q0 + alpha * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = np.arccos(min(dot, 1.0))
    return (np.sin((1 - alpha) * theta) * q0 + np.sin(alpha * theta) * q1) / np.sin(theta)


def pose_matrix(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = translation
    return out


def interpolate_poses(times: np.ndarray, poses: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Poses (T,4,4) keyed by increasing `times`, sampled at `at`: linear translation, SLERP rotation, the end
    poses held outside the range."""
    times = np.asarray(times, np.float64)
    out = np.empty((len(at), 4, 4))
    quats = quat_from_matrix(poses[:, :3, :3])
    for n, t in enumerate(np.asarray(at, np.float64)):
        exact = np.nonzero(times == t)[0]
        if exact.size:  # a source frame: its pose as given
            out[n] = poses[exact[0]]
            continue
        if len(times) == 1 or t <= times[0]:
            out[n] = poses[0]
            continue
        if t >= times[-1]:
            out[n] = poses[-1]
            continue
        i = int(np.clip(np.searchsorted(times, t), 1, len(times) - 1))
        alpha = (t - times[i - 1]) / (times[i] - times[i - 1])
        trans = (1 - alpha) * poses[i - 1, :3, 3] + alpha * poses[i, :3, 3]
        out[n] = pose_matrix(matrix_from_quat(slerp(quats[i - 1], quats[i], alpha)), trans)
    return out


def euler_to_camera_rotation(yaw_deg: float, pitch_down_deg: float, roll_deg: float) -> np.ndarray:
    """Camera-to-vehicle rotation (FLU vehicle, OpenCV camera) of a camera looking along `yaw` (left positive),
    tilted down by `pitch_down` and rolled by `roll` about its optical axis: Rz(yaw) Ry(pitch) Rx(roll) M, with M
    taking camera x (right), y (down), z (forward) to vehicle -y, -z, +x."""
    y, p, r = np.radians([yaw_deg, pitch_down_deg, roll_deg])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    ry = np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])
    rx = np.array([[1, 0, 0], [0, np.cos(r), -np.sin(r)], [0, np.sin(r), np.cos(r)]])
    m = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    return rz @ ry @ rx @ m
