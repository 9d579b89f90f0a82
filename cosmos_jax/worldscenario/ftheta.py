"""The f-theta camera of the reference world-scenario renderer (numpy, float64).

Spec: `docs/control_videos.md` §2.1-2.4. A camera is the intrinsics vector `[cx, cy, W, H, p0..p5, is_bw_poly,
(c, d, e)]`; the given polynomial is backward (pixel radius -> angle, `bw`) or forward (angle -> radius, `fw`) and
the other one is a least-squares inverse (§2.3). Projection (§2.2) maps the angle theta of a camera-frame ray to a
radius with `fw` up to the largest angle seen at an image corner (theta_max) and linearly beyond it, so points
outside the view, even behind the camera, still land somewhere (the rasteriser clips them at depth 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np


class CameraModelError(ValueError):
    """Intrinsics the f-theta model cannot use (the message names the camera when the caller knows it)."""


def poly_eval(coeffs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """sum_i c_i x^i by Horner's scheme."""
    out = np.zeros_like(np.asarray(x, np.float64))
    for c in np.asarray(coeffs, np.float64)[::-1]:
        out = out * x + c
    return out


def poly_deriv_eval(coeffs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """d/dx sum_i c_i x^i."""
    c = np.asarray(coeffs, np.float64)
    return poly_eval(c[1:] * np.arange(1, len(c)), x)


def max_radius(width: float, height: float, cx: float, cy: float) -> float:
    """Distance from the principal point to the farthest image corner (§2.3 R_max)."""
    mx = cx if cx > 0.5 * width else width - cx
    my = cy if cy > 0.5 * height else height - cy
    return float(np.hypot(mx, my))


def fw_domain_max_angle(fw: np.ndarray, radius: float) -> float:
    """Largest angle (steps of pi/2000) where fw is increasing and, at most, first exceeds `radius` (§2.3)."""
    angles = np.arange(1, 2001) * (np.pi / 2000)
    values, slopes = poly_eval(fw, angles), poly_deriv_eval(fw, angles)
    angle = 0.0
    for a, v, d in zip(angles, values, slopes):
        if d <= 0.0:
            break
        angle = float(a)
        if v > radius:
            break
    return angle


def fit_inverse_poly(coeffs: np.ndarray, lo: float, hi: float, samples: int = 500) -> np.ndarray:
    """Degree-(len-1) inverse of a polynomial on [lo, hi]: least squares on 500 swapped samples, no constant term,
    coefficients rounded to float32 (§2.3; matches the reference's bounded `curve_fit` to < 1e-5 px)."""
    ys = np.linspace(lo, hi, samples)
    xs = poly_eval(coeffs, ys)
    scale = float(np.max(np.abs(xs))) or 1.0
    powers = np.arange(1, len(coeffs))
    design = (xs[:, None] / scale) ** powers  # scaled columns keep the solve well conditioned
    sol, *_ = np.linalg.lstsq(design, ys, rcond=None)
    inv = np.zeros(len(coeffs))
    inv[1:] = (sol / scale ** powers).astype(np.float32)
    return inv


@dataclasses.dataclass(frozen=True)
class FThetaCamera:
    """f-theta intrinsics at one resolution, both polynomials and the extrapolation constants (§2.1-2.4)."""

    cx: float
    cy: float
    width: int
    height: int
    fw: np.ndarray  # (6,) angle -> pixel radius
    bw: np.ndarray  # (6,) pixel radius -> angle
    reference_poly: str  # "bw" | "fw": which polynomial was given (the other is fitted)
    linear_cde: tuple[float, float, float] = (1.0, 0.0, 0.0)
    max_angle: float = 0.0  # theta_max (rad)
    max_distortion: tuple[float, float] = (0.0, 0.0)  # fw(theta_max), fw'(theta_max)

    @property
    def A(self) -> np.ndarray:
        c, d, e = self.linear_cde
        return np.array([[c, d], [e, 1.0]])

    @property
    def A_inv(self) -> np.ndarray:
        c, d, e = self.linear_cde
        return np.array([[1.0, -d], [-e, c]]) / (c - e * d)

    @classmethod
    def from_intrinsics(cls, intrinsics) -> "FThetaCamera":
        """From `[cx, cy, W, H, p0..p5, is_bw_poly, (c, d, e)]` at the sensor's own resolution (§1.5, §2.1)."""
        v = np.asarray(intrinsics, np.float64).reshape(-1)
        if v.size not in (11, 14):
            raise CameraModelError(f"f-theta intrinsics need 11 or 14 numbers, got {v.size}")
        if not np.all(np.isfinite(v)):
            raise CameraModelError("f-theta intrinsics contain NaN or inf")
        cde = tuple(float(x) for x in (v[11:14] if v.size == 14 else (1.0, 0.0, 0.0)))
        poly = v[4:10].astype(np.float32).astype(np.float64)
        return cls.from_poly(float(np.float32(v[0])), float(np.float32(v[1])), int(v[2]), int(v[3]), poly,
                             bool(v[10] > 0), cde)

    @classmethod
    def from_poly(cls, cx: float, cy: float, width: int, height: int, poly: np.ndarray, is_bw: bool,
                  linear_cde=(1.0, 0.0, 0.0)) -> "FThetaCamera":
        """Fit the missing polynomial, then theta_max and the extrapolation constants (§2.2-2.3)."""
        if width <= 0 or height <= 0:
            raise CameraModelError(f"f-theta image size must be positive, got {width}x{height}")
        c, d, e = linear_cde
        if abs(c - e * d) < 1e-12:
            raise CameraModelError("f-theta linear term [[c, d], [e, 1]] is singular")
        poly = np.asarray(poly, np.float64)
        if poly.shape != (6,):
            raise CameraModelError(f"f-theta polynomial needs 6 coefficients, got {poly.shape}")
        radius = max_radius(width, height, cx, cy)
        if is_bw:
            bw, fw = poly, fit_inverse_poly(poly, 0.0, radius)
        else:
            fw = poly
            bw = fit_inverse_poly(poly, 0.0, fw_domain_max_angle(poly, radius))
        cam = cls(cx, cy, int(width), int(height), fw, bw, "bw" if is_bw else "fw", tuple(map(float, linear_cde)))
        return cam._with_limits()

    def _with_limits(self) -> "FThetaCamera":
        corners = np.array([[0, 0], [self.width - 1, 0], [0, self.height - 1], [self.width - 1, self.height - 1]],
                           np.float64)
        theta_max = float(np.max(self.pixel_angle(corners)))
        slope = float(poly_deriv_eval(self.fw, theta_max))
        if not np.isfinite(theta_max) or slope < 0:
            raise CameraModelError("f-theta forward polynomial decreases at the image edge (derivative < 0)")
        value = float(np.float32(poly_eval(self.fw, theta_max)))
        return dataclasses.replace(self, max_angle=theta_max, max_distortion=(value, float(np.float32(slope))))

    def rescaled(self, height: int, width: int) -> "FThetaCamera":
        """The camera at another resolution (§2.4): sizes int(W*rw), int(H*rh), centre scaled, polynomials scaled
        by the geometric mean ratio (bw_i * avg^-i or fw * avg), the other polynomial and limits re-derived."""
        rh, rw = height / self.height, width / self.width
        avg = float(np.sqrt(rw * rh))
        cx, cy = float(np.float32(self.cx * rw)), float(np.float32(self.cy * rh))
        if self.reference_poly == "bw":
            poly, is_bw = self.bw * (1.0 / avg) ** np.arange(6), True
        else:
            poly, is_bw = self.fw / (1.0 / avg), False
        return FThetaCamera.from_poly(cx, cy, int(self.width * rw), int(self.height * rh), poly, is_bw,
                                      self.linear_cde)

    def pixel_angle(self, uv: np.ndarray) -> np.ndarray:
        """Angle from the optical axis of the ray through each pixel (backward polynomial, §2.2)."""
        xd = (np.asarray(uv, np.float64) - [self.cx, self.cy]) @ self.A_inv.T
        return poly_eval(self.bw, np.linalg.norm(xd, axis=-1))

    def pixel_to_ray(self, uv: np.ndarray) -> np.ndarray:
        """Unit camera-frame rays (OpenCV: x right, y down, z forward) through pixels (§2.2 backward map)."""
        xd = (np.asarray(uv, np.float64) - [self.cx, self.cy]) @ self.A_inv.T
        rho = np.linalg.norm(xd, axis=-1, keepdims=True)
        theta = poly_eval(self.bw, rho)
        safe = np.where(rho > np.finfo(np.float32).eps, rho, 1.0)
        rays = np.concatenate([np.sin(theta) * xd / safe, np.cos(theta)], axis=-1)
        return np.where(rho > np.finfo(np.float32).eps, rays, [0.0, 0.0, 1.0])

    def ray_to_pixel(self, points: np.ndarray) -> np.ndarray:
        """Pixel (u, v) of camera-frame points (§2.2); no test on z, behind-camera points land somewhere too."""
        p = np.asarray(points, np.float64)
        r = np.hypot(p[..., 0], p[..., 1])
        with np.errstate(invalid="ignore", divide="ignore"):
            cos_t = p[..., 2] / np.linalg.norm(p, axis=-1)
            inside = (cos_t > -1.0) & (cos_t < 1.0)
            theta = np.where(inside, np.arccos(np.clip(cos_t, -1.0, 1.0)), r)
            val, slope = self.max_distortion
            rho = np.where(theta <= self.max_angle, poly_eval(self.fw, theta),
                           val + (theta - self.max_angle) * slope)
            scale = np.where(r > 0, rho / np.where(r > 0, r, 1.0), 0.0)
        xy = p[..., :2] * scale[..., None]
        return xy @ self.A.T + [self.cx, self.cy]

    def fov_deg(self) -> tuple[float, float]:
        """Horizontal and vertical field of view in degrees (through the principal point's row/column)."""
        left = self.pixel_angle(np.array([[0.0, self.cy]]))[0]
        right = self.pixel_angle(np.array([[self.width - 1.0, self.cy]]))[0]
        top = self.pixel_angle(np.array([[self.cx, 0.0]]))[0]
        bottom = self.pixel_angle(np.array([[self.cx, self.height - 1.0]]))[0]
        return float(np.degrees(left + right)), float(np.degrees(top + bottom))


def world_to_camera(points_world: np.ndarray, camera_to_world: np.ndarray) -> np.ndarray:
    """Camera-frame coordinates of world points for a 4x4 camera-to-world pose (§2.5)."""
    w2c = np.linalg.inv(np.asarray(camera_to_world, np.float64))
    return np.asarray(points_world, np.float64) @ w2c[:3, :3].T + w2c[:3, 3]


def project(camera: FThetaCamera, points_world: np.ndarray, camera_to_world: np.ndarray) -> np.ndarray:
    """(u, v, depth) of world points (§2.2 `get_xy_and_depth`): depth is the camera-frame z, may be negative."""
    pc = world_to_camera(points_world, camera_to_world)
    return np.concatenate([camera.ray_to_pixel(pc), pc[..., 2:3]], axis=-1)
