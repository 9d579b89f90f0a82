"""World-space geometry of the reference renderer: subdivision, laneline patterns, cuboids, triangulation.

Spec: `docs/control_videos.md` §3.4 (subdivision), §3.5 (laneline patterns on 0.05 m segments), §3.6 (polygons:
Delaunay triangulation of the subdivided boundary in the x-y plane, i.e. the filled convex hull), §3.7-3.8
(cuboid corner order, face and edge lists, the traffic-light loop). Arithmetic follows the reference's float32
rounding where it decides which pieces a pattern keeps.
"""

from __future__ import annotations

import numpy as np


class DegenerateGeometry(ValueError):
    """Geometry that cannot be drawn (e.g. a polygon whose points are all on one line)."""


# ---------------------------------------------------------------------------------------------------- subdivision
def subdivide(points: np.ndarray, step: float) -> np.ndarray:
    """Densify a polyline (§3.4, pcd_utils): each edge gets max(2, int(len/step)) evenly spaced points, its last
    one dropped, and the final vertex is appended. float32 in, float32 out."""
    pts = np.asarray(points, np.float32)
    if len(pts) < 2:
        return pts.copy()
    pieces = []
    for a, b in zip(pts[:-1], pts[1:]):
        n = max(int(np.linalg.norm(b - a) / step), 2)
        pieces.append(np.linspace(a, b, num=n)[:-1])
    pieces.append(pts[-1:])
    return np.concatenate(pieces).astype(np.float32)


def segments(points: np.ndarray) -> np.ndarray:
    """Consecutive point pairs (N-1, 2, 3)."""
    return np.stack([points[:-1], points[1:]], axis=1)


# ------------------------------------------------------------------------------------------------ laneline patterns
def _cumulative(segs: np.ndarray):
    lengths = np.linalg.norm(segs[:, 1] - segs[:, 0], axis=1)  # float32
    cum = np.concatenate([[0.0], np.cumsum(lengths).astype(np.float64)])  # accumulated in float32 as the reference
    return lengths, cum


def _dashes(cum: np.ndarray, n_segs: int, dash: float, gap: float):
    """(start, end, i0, i1) of every dash along the arc length `cum` ([0, ..., total], per segment end) that
    touches segments i0..i1 (dashes start every dash + gap metres from 0; the last one ends at the total)."""
    total = cum[-1]
    start = 0.0
    while start < total:
        end = min(start + dash, total)
        i0 = int(np.searchsorted(cum[1:], start, side="right"))
        i1 = int(np.searchsorted(cum[1:], end, side="left"))
        if i0 <= i1 < n_segs:
            yield start, end, i0, i1
        start += dash + gap


def long_dashed(segs: np.ndarray, dash: float = 3.0, gap: float = 9.0) -> np.ndarray:
    """3 m on / 9 m off along the arc length; segments crossing a dash end are cut there (§3.5)."""
    if len(segs) == 0:
        return segs
    lengths, cum = _cumulative(segs)
    out = []
    for start, end, i0, i1 in _dashes(cum, len(segs), dash, gap):
        for i in range(i0, i1 + 1):
            a, b = cum[i], cum[i + 1]
            p, q = segs[i, 0], segs[i, 1]
            if a >= start and b <= end:
                out.append(segs[i].astype(np.float64))
            elif a < start < b:
                s = p + (start - a) / lengths[i] * (q - p)
                e = q if b <= end else p + (end - a) / lengths[i] * (q - p)
                out.append(np.array([s, e], np.float64))
            elif a < end < b:
                out.append(np.array([p, p + (end - a) / lengths[i] * (q - p)], np.float64))
    return np.array(out) if out else np.empty((0, 2, 3))


def short_dashed(segs: np.ndarray, dash: float = 1.5, gap: float = 1.5) -> np.ndarray:
    """1.5 m on / 1.5 m off, whole segments only (§3.5)."""
    if len(segs) == 0:
        return segs
    _, cum = _cumulative(segs)
    keep = []
    for start, end, i0, i1 in _dashes(cum, len(segs), dash, gap):
        keep.extend(i for i in range(i0, i1 + 1) if cum[i] >= start and cum[i + 1] <= end)
    return segs[keep] if keep else np.empty((0, 2, 3))


def dot_dashed(segs: np.ndarray, step: float = 0.05) -> np.ndarray:
    """Every 3rd segment of an 18-segment (3 ft) period, then 54 segments (9 ft) off (§3.5)."""
    if len(segs) == 0:
        return segs
    on = max(1, int(3 * 0.3048 / step))
    off = max(1, int(9 * 0.3048 / step))
    if len(segs) <= on:
        return segs[::3]
    keep, i = [], 0
    while i < len(segs):
        stop = min(i + on, len(segs))
        keep.extend(range(i, stop, 3))
        i = stop + off
    return segs[keep] if keep else segs[:1]


def dotted_1_9(segs: np.ndarray) -> np.ndarray:
    """Every 10th segment (§3.5)."""
    return segs[::10]


def offset_pair(segs: np.ndarray, distance: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Copies shifted by +-distance along (-d_y, d_x, 0) of each segment's unit 3D direction (§3.5 dual)."""
    if len(segs) == 0:
        return segs, segs
    d = segs[:, 1] - segs[:, 0]
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    unit = d / np.where(norm == 0, 1, norm)
    perp = np.stack([-unit[:, 1], unit[:, 0], np.zeros(len(unit), unit.dtype)], axis=1) * distance
    perp = np.where(norm == 0, 0, perp)[:, None, :]
    return segs + perp, segs - perp


PATTERNS = {"solid": lambda s: s, "long_dashed": long_dashed, "short_dashed": short_dashed,
            "dot_dashed": dot_dashed, "dotted_1_9": dotted_1_9}


def laneline_pieces(points: np.ndarray, pattern: str, dual: tuple[str, str] | None = None,
                    step: float = 0.05) -> list[np.ndarray]:
    """Segment arrays (each (M, 2, 3)) drawn for one laneline (§3.5): subdivide at 0.05 m, then the pattern; a
    dual pattern draws its first pattern on the +offset copy and its second on the -offset copy."""
    sub = subdivide(points, step)
    if len(sub) < 2:
        return []
    segs = segments(sub)
    if pattern == "dual" and dual:
        left, right = offset_pair(segs)
        return [PATTERNS.get(dual[0], PATTERNS["solid"])(left), PATTERNS.get(dual[1], PATTERNS["solid"])(right)]
    return [PATTERNS.get(pattern, PATTERNS["solid"])(segs)]


# ----------------------------------------------------------------------------------------------------------- cuboids
# Corner order (§3.7): local x = length (heading), y = width, z = height; 0(+,+,+) 1(+,-,+) 2(-,-,+) 3(-,+,+),
# 4..7 the same at -z.
_CORNER_SIGNS = np.array([[1, 1, 1], [1, -1, 1], [-1, -1, 1], [-1, 1, 1],
                          [1, 1, -1], [1, -1, -1], [-1, -1, -1], [-1, 1, -1]], np.float64)
BOX_FACES = np.array([(0, 1, 5), (0, 4, 5), (2, 3, 7), (2, 6, 7), (0, 2, 3), (0, 1, 2),
                      (4, 6, 7), (4, 5, 6), (0, 4, 7), (0, 3, 7), (1, 5, 6), (1, 2, 6)])  # dynamic boxes
SIGN_FACES = np.array([(0, 1, 2), (0, 2, 3), (4, 5, 6), (4, 6, 7), (0, 1, 5), (0, 5, 4),
                       (1, 2, 6), (1, 6, 5), (2, 3, 7), (2, 7, 6), (3, 0, 4), (3, 4, 7)])  # signs
BOX_EDGES = np.array([(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4),
                      (0, 4), (1, 5), (2, 6), (3, 7)])
LIGHT_LOOP = np.array([0, 1, 2, 3, 0, 4, 5, 6, 7, 4, 5, 1, 2, 6, 7, 3])  # traffic light fan (§3.7)
FRONT_CORNERS, BACK_CORNERS = (0, 1, 4, 5), (2, 3, 6, 7)


def cuboid_corners(dims: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """(8, 3) world corners of a box of (length, width, height) under a 4x4 local-to-world transform (§3.7)."""
    local = _CORNER_SIGNS * (np.asarray(dims, np.float64) / 2.0)
    t = np.asarray(transform, np.float64)
    return local @ t[:3, :3].T + t[:3, 3]


def cuboid_from_corners(corners: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, (l, w, h) and rotation of an 8-corner cuboid label (§1.5): dims |c3-c0|, |c1-c0|, |c4-c0|, axes by
    Gram-Schmidt from c3-c0 and c1-c0, z = x cross y."""
    c = np.asarray(corners, np.float64)
    center = c.mean(axis=0)
    xv, yv, zv = c[3] - c[0], c[1] - c[0], c[4] - c[0]
    dims = np.array([np.linalg.norm(xv), np.linalg.norm(yv), np.linalg.norm(zv)])
    if np.any(dims < 1e-9):
        raise DegenerateGeometry(f"cuboid has a zero-length side (dims {dims.round(4).tolist()})")
    x = xv / dims[0]
    y = yv / dims[1]
    y = y - np.dot(y, x) * x
    ny = np.linalg.norm(y)
    if ny < 1e-9:
        raise DegenerateGeometry("cuboid sides c3-c0 and c1-c0 are parallel")
    y = y / ny
    z = np.cross(x, y)
    z = z / np.linalg.norm(z)
    return center, dims, np.stack([x, y, z], axis=1)


# ----------------------------------------------------------------------------------------------------- triangulation
def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _hull_with_collinear(pts: np.ndarray) -> list[int]:
    """Counter-clockwise convex hull indices keeping points that lie on hull edges (Andrew's monotone chain)."""
    order = sorted(range(len(pts)), key=lambda i: (pts[i, 0], pts[i, 1]))

    def chain(idx):
        out: list[int] = []
        for i in idx:
            while len(out) >= 2 and _cross(pts[out[-2]], pts[out[-1]], pts[i]) < 0:
                out.pop()
            out.append(i)
        return out

    lower, upper = chain(order), chain(order[::-1])
    hull = lower[:-1] + upper[:-1]
    seen, uniq = set(), []
    for i in hull:  # collinear extreme runs may repeat points
        if i not in seen:
            seen.add(i)
            uniq.append(i)
    return uniq


def _ear_clip(pts: np.ndarray, ring: list[int]) -> list[tuple[int, int, int]]:
    """Triangulate a simple counter-clockwise polygon (collinear vertices allowed) by ear clipping."""
    ring = list(ring)
    tris: list[tuple[int, int, int]] = []
    guard = 0
    while len(ring) > 3 and guard < 10 * len(ring) ** 2:
        guard += 1
        n = len(ring)
        clipped = False
        for k in range(n):
            a, b, c = ring[k - 1], ring[k], ring[(k + 1) % n]
            if _cross(pts[a], pts[b], pts[c]) <= 1e-12:
                continue
            inside = False
            for j in ring:
                if j in (a, b, c):
                    continue
                p = pts[j]
                if (_cross(pts[a], pts[b], p) >= 0 and _cross(pts[b], pts[c], p) >= 0
                        and _cross(pts[c], pts[a], p) >= 0):
                    inside = True
                    break
            if inside:
                continue
            tris.append((a, b, c))
            del ring[k]
            clipped = True
            break
        if not clipped:
            break
    if len(ring) == 3 and _cross(pts[ring[0]], pts[ring[1]], pts[ring[2]]) > 1e-12:
        tris.append(tuple(ring))
    elif len(ring) > 3:
        raise DegenerateGeometry("polygon could not be triangulated (self-intersecting?)")
    return tris


def _in_circle(a, b, c, d) -> float:
    """> 0 when d lies inside the circumcircle of the counter-clockwise triangle abc."""
    m = np.array([[a[0] - d[0], a[1] - d[1]], [b[0] - d[0], b[1] - d[1]], [c[0] - d[0], c[1] - d[1]]])
    s = (m ** 2).sum(axis=1)
    return (m[0, 0] * (m[1, 1] * s[2] - s[1] * m[2, 1]) - m[0, 1] * (m[1, 0] * s[2] - s[1] * m[2, 0])
            + s[0] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0]))


def delaunay(points2d: np.ndarray) -> np.ndarray:
    """Delaunay triangulation (M, 3) of 2D points: ear-clipped convex hull, interior points inserted, Lawson
    flips. Covers the convex hull like Qhull's; co-circular ties are broken arbitrarily."""
    raw = np.asarray(points2d, np.float64)
    uniq, first = np.unique(raw, axis=0, return_index=True)
    if len(uniq) < 3:
        raise DegenerateGeometry(f"needs 3 distinct points, has {len(uniq)}")
    keep = np.sort(first)
    pts = raw[keep]
    scale = float(np.ptp(pts, axis=0).max())
    pts = (pts - pts.mean(axis=0)) / scale
    hull = _hull_with_collinear(pts)
    area = sum(_cross(pts[hull[0]], pts[hull[i]], pts[hull[i + 1]]) for i in range(1, len(hull) - 1))
    if len(hull) < 3 or area <= 1e-12:
        raise DegenerateGeometry("all points lie on one line")
    tris = [list(t) for t in _ear_clip(pts, hull)]
    on_hull = set(hull)
    for p in (i for i in range(len(pts)) if i not in on_hull):
        _insert_point(pts, tris, p)
    _lawson_flips(pts, tris)
    return keep[np.array(tris, np.int64)]


def _insert_point(pts, tris, p):
    q = pts[p]
    for ti, (a, b, c) in enumerate(tris):
        w = (_cross(pts[a], pts[b], q), _cross(pts[b], pts[c], q), _cross(pts[c], pts[a], q))
        if min(w) < -1e-12:
            continue
        zero = [k for k in range(3) if abs(w[k]) <= 1e-12]
        if not zero:
            tris[ti] = [a, b, p]
            tris.extend([[b, c, p], [c, a, p]])
            return
        # on edge (u, v) of this triangle: split it and its neighbour across that edge
        u, v = [(a, b), (b, c), (c, a)][zero[0]]
        (o,) = [x for x in (a, b, c) if x not in (u, v)]
        tris[ti] = [u, p, o]
        tris.append([p, v, o])
        for tj, t in enumerate(tris):
            if tj != ti and v in t and u in t and p not in t:
                k = t.index(v)
                if t[(k + 1) % 3] == u:
                    (o2,) = [x for x in t if x not in (u, v)]
                    tris[tj] = [v, p, o2]
                    tris.append([p, u, o2])
                    break
        return


def _lawson_flips(pts, tris):
    """Flip edges whose opposite vertex lies inside the neighbour's circumcircle until none does."""
    edges = {}
    for ti, t in enumerate(tris):
        for k in range(3):
            edges[(t[k], t[(k + 1) % 3])] = ti
    stack = list(edges)
    budget = 100 * len(tris) ** 2 + 100
    while stack and budget:
        budget -= 1
        u, v = stack.pop()
        ti, tj = edges.get((u, v)), edges.get((v, u))
        if ti is None or tj is None:
            continue
        (o1,) = [x for x in tris[ti] if x not in (u, v)]
        (o2,) = [x for x in tris[tj] if x not in (u, v)]
        if _in_circle(pts[u], pts[v], pts[o1], pts[o2]) <= 1e-12:
            continue
        if _cross(pts[o1], pts[o2], pts[v]) <= 1e-12 or _cross(pts[o2], pts[o1], pts[u]) <= 1e-12:
            continue  # non-convex quad, cannot flip
        for t in (tris[ti], tris[tj]):
            for k in range(3):
                edges.pop((t[k], t[(k + 1) % 3]), None)
        tris[ti], tris[tj] = [o1, o2, v], [o2, o1, u]
        for idx in (ti, tj):
            t = tris[idx]
            for k in range(3):
                edges[(t[k], t[(k + 1) % 3])] = idx
        stack.extend([(u, o2), (o2, v), (v, o1), (o1, u)])


def triangulate_hull(vertices3d: np.ndarray) -> np.ndarray:
    """(M, 3, 3) triangles filling the x-y convex hull of a polygon's points (§3.6, reference behaviour)."""
    v = np.asarray(vertices3d, np.float64)
    if len(v) >= 2 and np.allclose(v[0], v[-1]):
        v = v[:-1]
    if len(v) < 3:
        return np.empty((0, 3, 3))
    return v[delaunay(v[:, :2])]


def triangulate_polygon(vertices3d: np.ndarray) -> np.ndarray:
    """(M, 3, 3) triangles of the polygon itself in the x-y plane (ear clipping; concave-safe; fixed mode)."""
    v = np.asarray(vertices3d, np.float64)
    if len(v) >= 2 and np.allclose(v[0], v[-1]):
        v = v[:-1]
    _, first = np.unique(v, axis=0, return_index=True)
    v = v[np.sort(first)]
    if len(v) < 3:
        raise DegenerateGeometry(f"needs 3 distinct points, has {len(v)}")
    pts = v[:, :2]
    area = 0.5 * np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1])
    if abs(area) <= 1e-12:
        raise DegenerateGeometry("all points lie on one line")
    ring = list(range(len(v))) if area > 0 else list(range(len(v)))[::-1]
    return v[np.array(_ear_clip(pts, ring), np.int64)]
