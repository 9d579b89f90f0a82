"""World-scenario renderer units: f-theta camera against an independent implementation of the spec formulas,
polynomial round trips, subdivision and laneline pattern counts, triangulation, the rasteriser's line model,
palettes and compat switches (docs/control_videos.md §2-§3)."""

import numpy as np
import pytest

from cosmos_jax.worldscenario import geometry, palette, raster, render, rig, transforms
from cosmos_jax.worldscenario.ftheta import FThetaCamera, project

CAMS = rig.DEFAULT_CAMERAS


# ------------------------------------------------------------------------------------- independent f-theta model
def _pv(c, x):
    return sum(ci * x ** i for i, ci in enumerate(c))


def _lsq_no_const(x, y):
    """y ~ sum_{i=1..5} a_i x^i by least squares (columns scaled), a_i rounded to float32."""
    s = np.abs(x).max()
    a = np.stack([(x / s) ** i for i in range(1, 6)], 1)
    sol = np.linalg.lstsq(a, y, rcond=None)[0] / s ** np.arange(1, 6)
    return np.concatenate([[0.0], sol.astype(np.float32)])


def spec_camera(intr, h=720, w=1280):
    """§2.1-2.4 written out directly: rescale, fit the missing polynomial, theta_max, extrapolation constants."""
    cx0, cy0, w0, h0 = intr[:4]
    poly = np.asarray(intr[4:10], np.float32).astype(np.float64)
    rw, rh = w / w0, h / h0
    avg = np.sqrt(rw * rh)
    cx, cy = cx0 * rw, cy0 * rh
    rmax = np.hypot(max(cx, w - cx), max(cy, h - cy))
    if intr[10] > 0:
        bwp = poly * avg ** -np.arange(6.0)
        rho = np.linspace(0, rmax, 500)
        fwp = _lsq_no_const(_pv(bwp, rho), rho)
    else:
        fwp = poly * avg
        amax, step = 0.0, np.pi / 2000
        for i in range(1, 2001):
            a = i * step
            if sum(k * fwp[k] * a ** (k - 1) for k in range(1, 6)) <= 0:
                break
            amax = a
            if _pv(fwp, a) > rmax:
                break
        th = np.linspace(0, amax, 500)
        bwp = _lsq_no_const(_pv(fwp, th), th)
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
    tmax = max(_pv(bwp, np.hypot(*(c - [cx, cy]))) for c in corners)
    val = _pv(fwp, tmax)
    der = sum(k * fwp[k] * tmax ** (k - 1) for k in range(1, 6))

    def proj(p):
        x, y, z = p
        r = np.hypot(x, y)
        c = z / np.linalg.norm(p)
        theta = np.arccos(c) if -1 < c < 1 else r
        rho = _pv(fwp, theta) if theta <= tmax else val + (theta - tmax) * der
        return np.array([cx, cy]) + (rho * np.array([x, y]) / r if r > 0 else 0.0)

    return proj, (cx, cy, tmax)


def _directions(rng, n, max_deg):
    theta = np.radians(rng.uniform(0, max_deg, n))
    phi = rng.uniform(0, 2 * np.pi, n)
    dist = rng.uniform(0.5, 150, n)
    return np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], 1) * dist[:, None]


@pytest.mark.parametrize("name", CAMS)
def test_projection_matches_spec_formulas(name):
    cam = FThetaCamera.from_intrinsics(rig.default_intrinsics(name)).rescaled(720, 1280)
    proj, (cx, cy, tmax) = spec_camera(rig.default_intrinsics(name))
    assert (cam.cx, cam.cy) == pytest.approx((cx, cy), abs=1e-3)
    assert cam.max_angle == pytest.approx(tmax, abs=1e-6)
    rng = np.random.default_rng(CAMS.index(name))
    # inside the view, beyond theta_max (linear extrapolation) and behind the camera
    pts = np.concatenate([_directions(rng, 300, np.degrees(tmax)), _directions(rng, 200, 179.0)])
    ours = cam.ray_to_pixel(pts)
    ref = np.stack([proj(p) for p in pts])
    assert np.abs(ours - ref).max() <= 0.05


# spec §2.6 table: 720p cx, cy, HFOV x VFOV, theta_max (all [run] on the reference)
SPEC_TABLE = {
    "camera_front_wide_120fov": (636.1, 504.8, 118.8, 65.9, 77.2),
    "camera_cross_left_120fov": (643.2, 496.3, 119.8, 66.4, 77.7),
    "camera_cross_right_120fov": (638.9, 496.2, 120.0, 66.5, 77.5),
    "camera_front_tele_30fov": (652.3, 398.4, 29.7, 16.7, 17.8),
    "camera_rear_left_70fov": (622.6, 371.5, 69.4, 39.1, 40.8),
    "camera_rear_right_70fov": (645.9, 369.2, 69.8, 39.2, 40.4),
    "camera_rear_tele_30fov": (688.3, 342.7, 29.8, 16.8, 18.3),
}


@pytest.mark.parametrize("name", CAMS)
def test_default_cameras_match_reference_table(name):
    cam = FThetaCamera.from_intrinsics(rig.default_intrinsics(name)).rescaled(720, 1280)
    cx, cy, hfov, vfov, tmax = SPEC_TABLE[name]
    assert (cam.width, cam.height) == (1280, 720)
    assert (round(cam.cx, 1), round(cam.cy, 1)) == (cx, cy)
    assert tuple(round(v, 1) for v in cam.fov_deg()) == (hfov, vfov)
    assert round(float(np.degrees(cam.max_angle)), 1) == tmax


@pytest.mark.parametrize("name", CAMS)
def test_forward_backward_round_trip(name):
    cam = FThetaCamera.from_intrinsics(rig.default_intrinsics(name)).rescaled(720, 1280)
    rng = np.random.default_rng(7)
    uv = rng.uniform([0, 0], [cam.width - 1, cam.height - 1], (400, 2))
    assert np.abs(cam.ray_to_pixel(cam.pixel_to_ray(uv)) - uv).max() <= 0.05
    theta = rng.uniform(0, cam.max_angle, 400)
    rho = sum(c * theta ** i for i, c in enumerate(cam.fw))
    assert np.abs(sum(c * rho ** i for i, c in enumerate(cam.bw)) - theta).max() < 2e-4  # < 0.1 px at f ~ 600


def test_bad_intrinsics_raise():
    from cosmos_jax.worldscenario.ftheta import CameraModelError
    with pytest.raises(CameraModelError):
        FThetaCamera.from_intrinsics([1.0, 2.0, 3.0])
    with pytest.raises(CameraModelError):
        FThetaCamera.from_intrinsics([np.nan] * 11)


def test_default_rig_extrinsics_point_the_cameras():
    for name in CAMS:
        pose = rig.nominal_camera_to_vehicle(name)
        assert np.allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-12)
        _, _, (yaw, pitch, _) = rig.DEFAULT_RIG[name]
        fwd = pose[:3, 2]  # optical axis in the vehicle frame
        assert np.degrees(np.arctan2(fwd[1], fwd[0])) == pytest.approx(yaw if yaw != 180 else 180, abs=1e-6) or \
            abs(abs(np.degrees(np.arctan2(fwd[1], fwd[0]))) - 180) < 1e-6
        assert np.degrees(np.arcsin(-fwd[2])) == pytest.approx(pitch, abs=1e-6)
    # a point 10 m ahead of the front camera projects near the principal point
    cam = FThetaCamera.from_intrinsics(rig.default_intrinsics(CAMS[0])).rescaled(720, 1280)
    pose = rig.nominal_camera_to_vehicle(CAMS[0])
    uvd = project(cam, (pose[:3, :3] @ [0, 0, 10.0]) + pose[:3, 3], pose)
    assert uvd[0] == pytest.approx(cam.cx, abs=1e-6) and uvd[2] == pytest.approx(10.0)


# ----------------------------------------------------------------------------------------------- geometry
def test_subdivision_counts():
    line = np.array([[0, 0, 0], [10, 0, 0], [10, 2.0, 0]], np.float32)
    sub = geometry.subdivide(line, 0.05)
    # 10 m: int(200) points, last dropped; 2 m: 40 points, last dropped; + final vertex
    assert len(sub) == 199 + 39 + 1
    assert np.allclose(sub[-1], [10, 2, 0]) and np.allclose(sub[199], [10, 0, 0])
    short = geometry.subdivide(np.array([[0, 0, 0], [0.01, 0, 0]]), 0.8)  # at least 2 points per edge
    assert len(short) == 2
    assert len(geometry.subdivide(np.array([[0, 0, 0], [4, 0, 0]]), 0.8)) == 5 + 0  # int(5)=5 -> 4 kept + last


def _straight(length, step=0.05):
    pts = geometry.subdivide(np.array([[0, 0, 0], [length, 0, 0]], np.float32), step)
    return geometry.segments(pts)


def _drawn_intervals(segs):
    xs = np.sort(segs[:, :, 0], axis=1)
    return xs


def test_long_dashed_pattern():
    segs = _straight(30.0)
    dashed = geometry.long_dashed(segs)
    iv = _drawn_intervals(dashed)
    assert np.sum(iv[:, 1] - iv[:, 0]) == pytest.approx(9.0, abs=1e-3)  # dashes [0,3], [12,15], [24,27]
    for a, b in iv:
        assert any(d - 1e-4 <= a and b <= d + 3 + 1e-4 for d in (0, 12, 24))


def test_short_dashed_pattern():
    segs = _straight(30.0)
    iv = _drawn_intervals(geometry.short_dashed(segs))
    # whole 0.05 m segments inside [3k, 3k + 1.5]: 30 or 29 per dash (float32 cumulative length at the ends)
    per_dash = [int(np.sum((iv[:, 0] >= d - 1e-4) & (iv[:, 1] <= d + 1.5 + 1e-4))) for d in np.arange(0, 30, 3.0)]
    assert len(iv) == sum(per_dash) and all(c in (29, 30) for c in per_dash)


def test_dot_and_dotted_patterns():
    segs = _straight(20.0)  # 399 segments
    n = len(segs)
    assert n == 399
    dd = geometry.dot_dashed(segs)
    expect = [i for start in range(0, n, 18 + 54) for i in range(start, min(start + 18, n), 3)]
    assert np.array_equal(dd, segs[expect])
    assert len(geometry.dotted_1_9(segs)) == int(np.ceil(n / 10))
    assert len(geometry.dot_dashed(segs[:10])) == 4  # shorter than one period: every 3rd


def test_dual_pattern_offsets_laterally():
    left, right = geometry.offset_pair(_straight(2.0))
    assert np.allclose(left[..., 1], 0.1, atol=1e-6) and np.allclose(right[..., 1], -0.1, atol=1e-6)
    pieces = geometry.laneline_pieces(np.array([[0, 0, 0], [30, 0, 0]]), "dual", ("long_dashed", "solid"))
    assert len(pieces) == 2 and len(pieces[1]) == 599 and np.allclose(pieces[0][..., 1], 0.1, atol=1e-6)


def test_cuboid_corner_order_and_from_corners():
    t = transforms.pose_matrix(transforms.euler_to_camera_rotation(30, 0, 0) @ np.linalg.inv(
        transforms.euler_to_camera_rotation(0, 0, 0)), [1, 2, 3])
    c = geometry.cuboid_corners([4.0, 2.0, 1.5], t)
    local = (c - t[:3, 3]) @ t[:3, :3]
    assert np.allclose(local[0], [2, 1, 0.75]) and np.allclose(local[6], [-2, -1, -0.75])
    center, dims, rot = geometry.cuboid_from_corners(c)
    assert np.allclose(center, [1, 2, 3]) and np.allclose(dims, [4, 2, 1.5])
    assert np.allclose(geometry.cuboid_corners(dims, transforms.pose_matrix(rot, center))[[0, 1, 4]],
                       c[[2, 3, 6]])  # axes from c3-c0, c1-c0: the same box, corners relabelled
    with pytest.raises(geometry.DegenerateGeometry):
        geometry.cuboid_from_corners(np.zeros((8, 3)))


def test_triangulation_fills_convex_hull_and_rejects_lines():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = rng.random((int(rng.integers(3, 40)), 2))
        tri = geometry.delaunay(pts)
        area = sum(abs(geometry._cross(*pts[t])) for t in tri) / 2
        hull = geometry._hull_with_collinear(pts)
        h = pts[hull]
        hull_area = 0.5 * abs(np.sum(h[:, 0] * np.roll(h[:, 1], -1) - np.roll(h[:, 0], -1) * h[:, 1]))
        assert area == pytest.approx(hull_area, rel=1e-9)
        for t in tri:  # empty circumcircles
            a, b, c = pts[t] if geometry._cross(*pts[t]) > 0 else pts[t[[0, 2, 1]]]
            assert all(geometry._in_circle(a, b, c, q) <= 1e-9 for q in pts)
    arrow = np.array([[10, -0.15], [13, -0.15], [13, -0.55], [14.6, 0], [13, 0.55], [13, 0.15], [10, 0.15]])
    hull_tris = geometry.triangulate_hull(np.c_[arrow, np.zeros(7)])
    drawn_tris = geometry.triangulate_polygon(np.c_[arrow, np.zeros(7)])

    def area(tris):
        return sum(abs(geometry._cross(*t[:, :2])) for t in tris) / 2

    assert area(hull_tris) > area(drawn_tris) == pytest.approx(3 * 0.3 + 0.5 * 1.1 * 1.6, rel=1e-9)
    with pytest.raises(geometry.DegenerateGeometry):
        geometry.triangulate_hull(np.array([[0, 0, 0], [1, 1, 0], [2, 2, 0], [3, 3, 0.0]]))


# ----------------------------------------------------------------------------------------------- rasteriser
def _line_image(p0, p1, width=12.0, depth=0.0, samples=4):
    r = raster.Rasterizer(720, 1280, samples)
    r.draw_segments([p0], [p1], [depth], [depth], [[1.0, 1, 1]], [[1.0, 1, 1]], width)
    return r.resolve()[..., 0].astype(float) / 255


def test_line_width_is_applied_in_ndc():
    vertical = _line_image((640.1, 100), (640.1, 600))  # off the sample grid: no exact edge ties
    horizontal = _line_image((200, 360.1), (1000, 360.1))
    assert vertical[350].sum() == pytest.approx(12.0, abs=0.05)  # L px across a vertical line
    assert horizontal[:, 600].sum() == pytest.approx(12.0 * 720 / 1280, abs=0.05)  # L*H/W across a horizontal one
    # round caps extend the line by half a width along it (an ellipse in pixels)
    assert vertical[:, 640].sum() == pytest.approx(500 + 2 * 6 * 720 / 1280, abs=0.3)
    far = _line_image((640.1, 100), (640.1, 600), depth=100.0)  # width scale clamp(1 - (d0 + d1)/400)
    assert far[350].sum() == pytest.approx(6.0, abs=0.05)


def test_depth_test_and_draw_order():
    r = raster.Rasterizer(720, 1280, 1)
    tri = np.array([[[100, 100], [300, 100], [100, 300]]], float)
    r.draw_triangles(tri, [[50, 50, 50]], np.full((1, 3, 3), [1.0, 0, 0]))  # far red
    r.draw_triangles(tri, [[10, 10, 10]], np.full((1, 3, 3), [0, 1.0, 0]))  # near green, drawn later
    r.draw_triangles(tri, [[10, 10, 10]], np.full((1, 3, 3), [0, 0, 1.0]))  # same depth, later: loses
    assert r.resolve()[150, 150].tolist() == [0, 255, 0]
    r = raster.Rasterizer(720, 1280, 1)  # near-plane clipping: depth < 0 is cut where screen-linear depth hits 0
    r.draw_triangles(np.array([[[0, 0], [1279, 0], [0, 719]]], float), [[-10, 10, -10]], np.ones((1, 3, 3)))
    img = r.resolve()[..., 0]
    assert img[0, 1000] > 0 and img[0, 100] == 0 and img[0, 639] > 0 and img[0, 600] == 0


def test_depth_fade():
    assert np.allclose(raster.depth_fade([1.0, 0.5, 0.2], np.array(100.0)), [0.5, 0.25, 0.1])
    assert np.allclose(raster.depth_fade([1.0, 1, 1], np.array(-5.0)), 1.0)
    assert np.allclose(raster.depth_fade([1.0, 1, 1], np.array(250.0)), 0.0)


# ----------------------------------------------------------------------------------------------- palette / compat
def test_reference_quirks_and_fixes():
    assert palette.box_class("Truck") == "Others" and palette.box_class("Bus") == "Others"
    assert palette.box_class("Truck", "fixed") == "Truck" and palette.box_class("Bus", "fixed") == "Truck"
    assert palette.box_class("Automobile") == "Car" and palette.box_class("Motorcycle") == "Cyclist"
    assert palette.box_class("Animal") == "Others" and palette.box_class("Person") == "Pedestrian"
    other = palette.laneline_style("WHITE", "DASHED_SINGLE")
    assert other.color == (181, 164, 71) and other.pattern == "solid"
    assert palette.laneline_style("BLUE", "SOLID_SINGLE").color == (181, 164, 71)
    fixed = palette.laneline_style("WHITE", "DASHED_SINGLE", "fixed")
    assert fixed.color == (255, 255, 255) and fixed.pattern == "short_dashed"
    assert palette.laneline_style("WHITE", "SOLID_DOUBLE", "fixed").dual == ("solid", "solid")
    assert palette.laneline_style("YELLOW", "SOLID_DASHED").dual == ("long_dashed", "solid")
    with pytest.raises(ValueError):
        render.RenderOptions(compat="nope")
