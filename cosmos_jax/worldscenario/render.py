"""Scene -> control frames: the reference renderer's element preparation, draw order and per-frame projection.

Spec: `docs/control_videos.md` §3.4 (elements, colours, widths, subdivision), §3.5 (laneline patterns), §3.6
(polygons as filled convex hulls), §3.7 (signs: 12-triangle cuboids; lights: a 16-vertex triangle fan coloured by
state), §3.8 (boxes: 12 graded faces + 12 grey edges, culling), §3.9 (draw order: static lines grouped by width in
first-seen order, static triangles, traffic lights, boxes in track-id order each faces then edges).
`compat="fixed"` switches on the documented fixes (§7): truck colours, laneline styles the reference has no entry
for, polygons triangulated as drawn (concave-safe), traffic lights drawn as cuboids, boxes culled only when behind.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from cosmos_jax.worldscenario import geometry, palette, raster, transforms
from cosmos_jax.worldscenario.ftheta import FThetaCamera, project
from cosmos_jax.worldscenario.scene import Scene

log = logging.getLogger("cosmos_jax.worldscenario")

RESOLUTION = (720, 1280)  # RESIZE_RESOLUTION (H, W)


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """How to draw: `compat` reference|fixed, output size, MSAA samples (4 or 1), line width multiplier."""

    compat: str = "reference"
    height: int = RESOLUTION[0]
    width: int = RESOLUTION[1]
    samples: int = 4
    line_scale: float = 1.0

    def __post_init__(self):
        if self.compat not in palette.COMPAT_MODES:
            raise ValueError(f"compat must be one of {palette.COMPAT_MODES}, got {self.compat!r}")


@dataclasses.dataclass
class LineGroup:
    """World segments drawn in one call at one width (px at the 1280-wide viewport)."""

    width: float
    segments: np.ndarray  # (S, 2, 3)
    colors: np.ndarray  # (S, 3) base colour in [0, 1]


@dataclasses.dataclass
class StaticGeometry:
    """World-space static map, prepared once per clip (§3.4-3.7)."""

    lines: list[LineGroup]
    triangles: np.ndarray  # (M, 3, 3)
    triangle_colors: np.ndarray  # (M, 3)
    light_shapes: list[np.ndarray]  # per light: (16, 3) fan loop, or (12, 3, 3) cuboid triangles (fixed)


def _rgb(color) -> np.ndarray:
    return np.asarray(color, np.float64) / 255.0


def _polyline_items(scene: Scene):
    """(width, segments, colour) in the reference's order: road boundaries, poles, wait lines (§3.9)."""
    for key, elements in (("road_boundaries", scene.road_boundaries), ("poles", scene.poles),
                          ("wait_lines", scene.wait_lines)):
        segs = [geometry.segments(geometry.subdivide(e.points, palette.SUBDIVIDE_STEP_M[key]))
                for e in elements if len(e.points) >= 2]
        segs = [s for s in segs if len(s)]
        if segs:
            yield palette.LINE_WIDTHS[key], np.concatenate(segs), palette.MAP_COLORS[key]


def _laneline_items(scene: Scene, compat: str):
    for line in scene.lanelines:
        if len(line.points) < 2:
            continue
        style = palette.laneline_style(line.color, line.style, compat)
        for piece in geometry.laneline_pieces(line.points, style.pattern, style.dual):
            if len(piece):
                yield palette.LINE_WIDTHS["lanelines"] * style.thickness, piece, style.color


def _group_by_width(items) -> list[LineGroup]:
    """One draw call per width, groups in first-seen order, items in order inside a group (§3.9)."""
    groups: dict[float, list] = {}
    for width, segs, color in items:
        groups.setdefault(float(width), []).append((segs, color))
    out = []
    for width, parts in groups.items():
        segs = np.concatenate([np.asarray(s, np.float64) for s, _ in parts])
        colors = np.concatenate([np.tile(_rgb(c), (len(s), 1)) for s, c in parts])
        out.append(LineGroup(width, segs, colors))
    return out


def _polygon_triangles(polygon, compat: str) -> np.ndarray:
    sub = geometry.subdivide(polygon.vertices, palette.SUBDIVIDE_STEP_M["polygons"])
    try:
        if compat == "fixed":
            return geometry.triangulate_polygon(sub)
        return geometry.triangulate_hull(sub)
    except geometry.DegenerateGeometry as e:
        log.warning("%s: %s; not drawn", polygon.name, e)
        return np.empty((0, 3, 3))


def _box_transform(box) -> np.ndarray:
    # the reference keeps centre, dims and rotation of map cuboids in float32
    rot = np.asarray(box.rotation, np.float32).astype(np.float64)
    return transforms.pose_matrix(rot, np.asarray(box.center, np.float32))


def prepare_static(scene: Scene, compat: str = "reference") -> StaticGeometry:
    """World-space lines (subdivided, patterned, grouped by width), triangles and light shapes (§3.4-3.7)."""
    lines = _group_by_width(list(_polyline_items(scene)) + list(_laneline_items(scene, compat)))
    tris, colors = [], []
    for key, polys in (("crosswalks", scene.crosswalks), ("road_markings", scene.road_markings)):
        for poly in polys:
            t = _polygon_triangles(poly, compat)
            tris.append(t)
            colors.append(np.tile(_rgb(palette.MAP_COLORS[key]), (len(t), 1)))
    for sign in scene.traffic_signs:
        corners = geometry.cuboid_corners(np.asarray(sign.dims, np.float32), _box_transform(sign))
        tris.append(corners[geometry.SIGN_FACES])
        colors.append(np.tile(_rgb(palette.MAP_COLORS["traffic_signs"]), (12, 1)))
    lights = []
    for light in scene.traffic_lights:
        corners = geometry.cuboid_corners(np.asarray(light.box.dims, np.float32), _box_transform(light.box))
        lights.append(corners[geometry.SIGN_FACES] if compat == "fixed" else corners[geometry.LIGHT_LOOP])
    tris = [t for t in tris if len(t)]
    return StaticGeometry(lines, np.concatenate(tris) if tris else np.empty((0, 3, 3)),
                          np.concatenate([c for c in colors if len(c)]) if tris else np.empty((0, 3)), lights)


# ------------------------------------------------------------------------------------------------------ per frame
def _fan(loop: np.ndarray) -> np.ndarray:
    """TRIANGLE_FAN triangles (v0, v_i, v_i+1) of a vertex loop."""
    idx = np.arange(1, len(loop) - 1)
    return np.stack([np.zeros_like(idx), idx, idx + 1], axis=1)


def light_color(state: str) -> np.ndarray:
    if state not in palette.TRAFFIC_LIGHT_COLORS:
        state = "unknown"  # "off" has no colour in the reference (KeyError there)
    return _rgb(palette.TRAFFIC_LIGHT_COLORS[state])


def draw_static(r: raster.Rasterizer, cam: FThetaCamera, pose: np.ndarray, static: StaticGeometry, scale: float):
    for group in static.lines:
        if not len(group.segments):
            continue
        uvd = project(cam, group.segments.reshape(-1, 3), pose).reshape(-1, 2, 3)
        d0, d1 = uvd[:, 0, 2], uvd[:, 1, 2]
        r.draw_segments(uvd[:, 0, :2], uvd[:, 1, :2], d0, d1, raster.depth_fade(group.colors, d0),
                        raster.depth_fade(group.colors, d1), group.width * scale, cam.width)
    if len(static.triangles):
        uvd = project(cam, static.triangles.reshape(-1, 3), pose).reshape(-1, 3, 3)
        colors = raster.depth_fade(static.triangle_colors[:, None, :], uvd[..., 2])
        r.draw_triangles(uvd[..., :2], uvd[..., 2], colors)


def draw_lights(r: raster.Rasterizer, cam: FThetaCamera, pose: np.ndarray, static: StaticGeometry,
                states: list[str]):
    for shape, state in zip(static.light_shapes, states):
        base = light_color(state)
        if shape.ndim == 3:  # fixed: a cuboid
            uvd = project(cam, shape.reshape(-1, 3), pose).reshape(-1, 3, 3)
        else:
            uvd_loop = project(cam, shape, pose)
            if np.all(uvd_loop[:, 2] < 0):
                continue
            uvd = uvd_loop[_fan(shape)]
        r.draw_triangles(uvd[..., :2], uvd[..., 2], raster.depth_fade(base, uvd[..., 2]))


def box_visible(uvd: np.ndarray, width: int, height: int) -> bool:
    """Reference test (§3.8): some corner inside the image with positive depth."""
    u, v, d = uvd[:, 0], uvd[:, 1], uvd[:, 2]
    return bool(np.any((u >= 0) & (u < width) & (v >= 0) & (v < height) & (d > 0)))


def draw_boxes(r: raster.Rasterizer, cam: FThetaCamera, pose: np.ndarray, objects, compat: str, scale: float):
    forward, position = pose[:3, 2], pose[:3, 3]
    edge = _rgb(palette.BOX_EDGE_COLOR)
    for _, raw_type, center, dims, rot in objects:
        corners = geometry.cuboid_corners(dims, transforms.pose_matrix(rot, center))
        if np.all((corners - position) @ forward < 0):
            continue
        uvd = project(cam, corners, pose)
        if compat != "fixed" and not box_visible(uvd, cam.width, cam.height):
            continue
        front, back = palette.BOX_GRADIENTS[palette.box_class(raw_type, compat)]
        vcol = np.empty((8, 3))
        vcol[list(geometry.FRONT_CORNERS)] = _rgb(front)
        vcol[list(geometry.BACK_CORNERS)] = _rgb(back)
        faded = raster.depth_fade(vcol, uvd[:, 2])
        f = geometry.BOX_FACES
        r.draw_triangles(uvd[f][..., :2], uvd[f][..., 2], faded[f])
        e = geometry.BOX_EDGES
        d0, d1 = uvd[e[:, 0], 2], uvd[e[:, 1], 2]
        r.draw_segments(uvd[e[:, 0], :2], uvd[e[:, 1], :2], d0, d1, raster.depth_fade(edge, d0),
                        raster.depth_fade(edge, d1), palette.BOX_EDGE_WIDTH * scale, cam.width)


def render_frame(cam: FThetaCamera, pose: np.ndarray, static: StaticGeometry, objects, light_states,
                 options: RenderOptions) -> np.ndarray:
    """One camera, one frame -> uint8 (H, W, 3), in the reference's draw order (§3.9)."""
    r = raster.Rasterizer(cam.height, cam.width, options.samples)
    draw_static(r, cam, pose, static, options.line_scale)
    draw_lights(r, cam, pose, static, light_states)
    draw_boxes(r, cam, pose, objects, options.compat, options.line_scale)
    return r.resolve()


# ------------------------------------------------------------------------------------------------------- clip level
def frame_times(scene: Scene, fps: float | None = None, max_frames: int | None = None) -> np.ndarray:
    """Output timestamps (us): the source frames, or every 1/fps s from the first one up to the last (§1.6)."""
    ts = scene.timestamps
    if fps is None or abs(fps - scene.source_fps) < 1e-9:
        out = ts.astype(np.float64)
    else:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        n = int(np.floor((ts[-1] - ts[0]) * fps / 1e6 + 1e-6)) + 1
        out = ts[0] + np.arange(n) * 1e6 / fps
    if max_frames is not None and max_frames > 0:
        out = out[:max_frames]
    return out


def camera_model(scene: Scene, name: str, options: RenderOptions) -> FThetaCamera:
    cam = FThetaCamera.from_intrinsics(scene.cameras[name].intrinsics)
    if (cam.height, cam.width) != (options.height, options.width):
        rh, rw = options.height / cam.height, options.width / cam.width
        if abs(rh - rw) > 0.02:
            log.warning("%s: non-uniform rescale %.3f x %.3f to %dx%d", name, rh, rw, options.width, options.height)
        cam = cam.rescaled(options.height, options.width)
    return cam


def render_camera(scene: Scene, name: str, times: np.ndarray, static: StaticGeometry,
                  options: RenderOptions, on_frame=None) -> np.ndarray:
    """All frames of one camera -> uint8 (T, H, W, 3)."""
    cam = camera_model(scene, name, options)
    poses = scene.camera_to_world(name, times)
    out = np.empty((len(times), cam.height, cam.width, 3), np.uint8)
    for k, t in enumerate(times):
        states = [light.state_at(scene.light_frame(t)) for light in scene.traffic_lights]
        out[k] = render_frame(cam, poses[k], static, scene.objects_at(t), states, options)
        if on_frame:
            on_frame(name, k)
    return out
