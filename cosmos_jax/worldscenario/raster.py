"""A CPU rasteriser (vectorised numpy) that draws what the reference's OpenGL pipeline draws.

Spec: `docs/control_videos.md` §3.1-3.3. The reference hands OpenGL already projected vertices (u, v, depth) with
w = 1, so everything is affine in window coordinates: positions, depth and colours interpolate linearly in screen
space and near/far clipping (0 <= depth <= 200 m) cuts primitives where the screen-linear depth crosses the plane.
Two primitive kinds cover every element:

* thick line segments (§3.3, the geometry shader): a quad offset by half the width along the segment's normal
  *in NDC* (so a horizontal line is H/W as thick as a vertical one), width scaled by clamp(1 - (d0+d1)/400), plus a
  half 16-gon round cap at each end, the quad's depth/colour interpolated along the segment, the caps constant;
* triangles with per-vertex depth and colour.

Both are convex polygons; each is scanned one sample row at a time (the row's span is the intersection of the
polygon's half-planes), giving fragments (sample, depth, primitive). The depth test (GL_LESS, a 24-bit buffer
cleared to 1.0, draw order breaking ties) is order independent: the surviving fragment of a sample is the one
with the smallest (quantised depth, draw index) key, taken with `np.minimum.at`. Colours are evaluated once per
covered sample at the pixel centre (as a fragment shader runs once per pixel under MSAA), quantised to 8 bits,
and the 4 samples of a pixel averaged (the MSAA resolve). Sample positions: the standard 4x pattern.
"""

from __future__ import annotations

import numpy as np

DEPTH_MAX = 200.0  # m, `depth_max` uniform (§3.1)
_DEPTH_BITS = 24
_DEPTH_CLEAR = (1 << _DEPTH_BITS) - 1
_ORDER_BITS = 39
_ORDER_MASK = (1 << _ORDER_BITS) - 1
_EMPTY = np.iinfo(np.int64).max
# 4x MSAA sample offsets inside a pixel, image coordinates (y down); the GL pattern (0.375, 0.125), (0.875, 0.375),
# (0.125, 0.625), (0.625, 0.875) has its origin at the bottom-left, the image is read back flipped.
SAMPLE_POSITIONS = {
    4: np.array([[0.375, 0.875], [0.875, 0.625], [0.125, 0.375], [0.625, 0.125]]),
    1: np.array([[0.5, 0.5]]),
}
_CAP_SEGMENTS = 8
_ROW_CHUNK = 1 << 21  # half-plane evaluations per chunk (rows x edges)
_FRAG_CHUNK = 1 << 22


def depth_fade(color: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Per-vertex colour of the gradient vertex shader: base * clamp(1 - depth/200, 0, 1) (§3.2)."""
    return np.asarray(color, np.float64) * np.clip(1.0 - np.asarray(depth, np.float64) / DEPTH_MAX, 0.0, 1.0)[..., None]


def capsule_outline(p0: np.ndarray, p1: np.ndarray, half_ndc: np.ndarray, width: int, height: int):
    """Window-space outline (N, 18, 2) of thick segments p0->p1 (pixels) as the geometry shader emits it (§3.3).

    The quad is offset by +-normal*half and each end gets a half 16-gon of radius `half` (NDC units), the cap
    vertices at cos(i pi/8) perp + sin(i pi/8) dir. Returns (outline, normal in pixels, valid); invalid rows are
    zero-length segments (NaN directions in the reference's shader: nothing is drawn).
    """
    to_ndc = np.array([2.0 / width, -2.0 / height])
    d = (p1 - p0) * to_ndc
    length = np.hypot(d[:, 0], d[:, 1])
    valid = length > 0
    dirn = d / np.where(valid, length, 1.0)[:, None]
    normal = np.stack([-dirn[:, 1], dirn[:, 0]], axis=1)
    angles = np.arange(_CAP_SEGMENTS + 1) * (np.pi / _CAP_SEGMENTS)
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    h = half_ndc[:, None, None]
    # end cap: from +normal through +dir to -normal; start cap: from -normal through -dir to +normal
    cap1 = (cos * normal[:, None] + sin * dirn[:, None]) * h
    cap0 = (cos * -normal[:, None] + sin * -dirn[:, None]) * h
    to_px = np.array([width / 2.0, -height / 2.0])
    outline = np.concatenate([p1[:, None] + cap1 * to_px, p0[:, None] + cap0 * to_px], axis=1)
    return outline, normal * to_px, valid


def _affine_from_vertices(xy: np.ndarray, values: np.ndarray):
    """Plane value = a0 + ax*x + ay*y through 3 vertices; xy (N,3,2), values (N,3,C) -> three (N,C) arrays."""
    e1, e2 = xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    inv = 1.0 / np.where(det == 0, 1.0, det)
    dv1, dv2 = values[:, 1] - values[:, 0], values[:, 2] - values[:, 0]
    ax = (dv1 * e2[:, 1:2] - dv2 * e1[:, 1:2]) * inv[:, None]
    ay = (dv2 * e1[:, 0:1] - dv1 * e2[:, 0:1]) * inv[:, None]
    a0 = values[:, 0] - ax * xy[:, 0, 0:1] - ay * xy[:, 0, 1:2]
    return a0, ax, ay


class Rasterizer:
    """One framebuffer (H x W, S samples) with a depth buffer; draw calls in the reference's order, then `resolve`."""

    def __init__(self, height: int, width: int, samples: int = 4):
        if samples not in SAMPLE_POSITIONS:
            raise ValueError(f"samples must be one of {sorted(SAMPLE_POSITIONS)}, got {samples}")
        self.height, self.width, self.samples = int(height), int(width), int(samples)
        self.zbuf = np.full(self.height * self.width * self.samples, _EMPTY, np.int64)
        self._params: list[np.ndarray] = []  # per primitive colour parameters, in draw order
        self._count = 0
        self.fragments = 0  # statistics: fragments generated (before the depth test)

    # ------------------------------------------------------------------------------------------------ draw calls
    def draw_segments(self, p0, p1, d0, d1, color0, color1, width_px: float, viewport_width: float | None = None):
        """Thick lines (§3.3): endpoints in pixels, depths (m), already depth-faded RGB in [0,1] per endpoint."""
        p0, p1 = np.asarray(p0, np.float64).reshape(-1, 2), np.asarray(p1, np.float64).reshape(-1, 2)
        d0, d1 = np.asarray(d0, np.float64).ravel(), np.asarray(d1, np.float64).ravel()
        n = len(p0)
        order = self._reserve(n)
        if n == 0:
            return
        vw = float(viewport_width or self.width)
        half = width_px / vw * np.clip(1.0 - (d0 + d1) / (2.0 * DEPTH_MAX), 0.0, 1.0)  # NDC half width (§3.3)
        # cull before building outlines: fully clipped in depth, or off screen with the half width as margin
        mx, my = half * self.width / 2.0, half * self.height / 2.0
        keep = ~((np.minimum(d0, d1) > DEPTH_MAX) | (np.maximum(d0, d1) < 0)) & (half > 0)
        keep &= np.isfinite(p0).all(axis=1) & np.isfinite(p1).all(axis=1)
        keep &= (np.maximum(p0[:, 0], p1[:, 0]) + mx >= 0) & (np.minimum(p0[:, 0], p1[:, 0]) - mx <= self.width)
        keep &= (np.maximum(p0[:, 1], p1[:, 1]) + my >= 0) & (np.minimum(p0[:, 1], p1[:, 1]) - my <= self.height)
        params = np.zeros((n, 15))
        self._params.append(params)
        idx = np.nonzero(keep)[0]
        if idx.size == 0:
            return
        p0, p1, d0, d1, half = p0[idx], p1[idx], d0[idx], d1[idx], half[idx]
        outline, normal_px, valid = capsule_outline(p0, p1, half, self.width, self.height)
        # t: 0 on the p0 edge, 1 on the p1 edge, constant along the (window-space image of the) NDC normal
        e = p1 - p0
        den = e[:, 0] * normal_px[:, 1] - e[:, 1] * normal_px[:, 0]
        valid &= den != 0
        inv = 1.0 / np.where(den == 0, 1.0, den)
        tx, ty = normal_px[:, 1] * inv, -normal_px[:, 0] * inv
        t0 = -(tx * p0[:, 0] + ty * p0[:, 1])
        c0 = np.broadcast_to(color0, (n, 3))[idx]
        params[idx, 0:3] = c0
        params[idx, 9:12] = np.broadcast_to(color1, (n, 3))[idx] - c0
        params[idx, 12], params[idx, 13], params[idx, 14] = t0, tx, ty
        depth = np.stack([d0, d1 - d0, t0, tx, ty], axis=1)
        self._submit(outline, valid, depth, order[idx], capsule=True)

    def draw_triangles(self, xy, depth, colors):
        """Filled triangles: xy (M,3,2) pixels, depth (M,3) m, per-vertex faded RGB (M,3,3) in [0,1]."""
        xy = np.asarray(xy, np.float64).reshape(-1, 3, 2)
        depth = np.asarray(depth, np.float64).reshape(-1, 3)
        m = len(xy)
        order = self._reserve(m)
        if m == 0:
            return
        colors = np.broadcast_to(np.asarray(colors, np.float64), (m, 3, 3))
        e1, e2 = xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0]
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        valid = (det != 0) & np.isfinite(xy).all(axis=(1, 2)) & np.isfinite(depth).all(axis=1)
        valid &= ~((depth.min(axis=1) > DEPTH_MAX) | (depth.max(axis=1) < 0))
        z0, zx, zy = _affine_from_vertices(xy, depth[..., None])
        c0, cx, cy = _affine_from_vertices(xy, colors)
        params = np.zeros((m, 15))
        params[:, 0:3], params[:, 3:6], params[:, 6:9] = c0, cx, cy
        self._params.append(params)
        self._submit(xy, valid, np.stack([z0[:, 0], zx[:, 0], zy[:, 0]], axis=1), order, capsule=False)

    # ------------------------------------------------------------------------------------------------ internals
    def _reserve(self, n: int) -> np.ndarray:
        """Draw indices for n primitives, in submission order (the depth test's tie-break)."""
        order = self._count + np.arange(n, dtype=np.int64)
        self._count += n
        return order

    def _submit(self, poly: np.ndarray, valid: np.ndarray, depth: np.ndarray, order: np.ndarray, capsule: bool):
        """Cull off-screen polygons, scan-convert the rest, depth-test their fragments."""
        lo, hi = poly.min(axis=1), poly.max(axis=1)
        valid = valid & (hi[:, 0] >= 0) & (lo[:, 0] <= self.width) & (hi[:, 1] >= 0) & (lo[:, 1] <= self.height)
        valid &= np.isfinite(lo).all(axis=1) & np.isfinite(hi).all(axis=1)
        idx = np.nonzero(valid)[0]
        if idx.size == 0:
            return
        poly = poly[idx]
        # inward half-planes a*x + b*y + c >= 0 (orientation from the signed area)
        nxt = np.roll(poly, -1, axis=1)
        area = np.sum(poly[..., 0] * nxt[..., 1] - nxt[..., 0] * poly[..., 1], axis=1)
        sign = np.where(area >= 0, 1.0, -1.0)[:, None]
        a = -(nxt[..., 1] - poly[..., 1]) * sign
        b = (nxt[..., 0] - poly[..., 0]) * sign
        c = -(a * poly[..., 0] + b * poly[..., 1])
        rows0 = np.clip(np.floor(lo[idx, 1]), 0, self.height - 1).astype(np.int64)
        rows1 = np.clip(np.floor(hi[idx, 1]), 0, self.height - 1).astype(np.int64)
        nrows = rows1 - rows0 + 1
        ylim = np.stack([lo[idx, 1], hi[idx, 1]], axis=1)
        k_edges = poly.shape[1]
        # process primitives in chunks bounded by rows x edges
        cum = np.cumsum(nrows)
        start = 0
        while start < len(idx):
            base = cum[start - 1] if start else 0
            stop = int(np.searchsorted(cum, base + max(_ROW_CHUNK // k_edges, 1), side="right"))
            stop = max(stop, start + 1)
            sl = slice(start, stop)
            self._scan(a[sl], b[sl], c[sl], ylim[sl], rows0[sl], nrows[sl], depth[idx[sl]], order[idx[sl]], capsule)
            start = stop

    def _scan(self, a, b, c, ylim, rows0, nrows, depth, order, capsule):
        """Sample rows of each polygon -> covered column spans: an edge a*x + b*y + c >= 0 with a > 0 bounds x
        from below at (-b*y - c)/a, with a < 0 from above; horizontal edges only bound y (the y-range test)."""
        eps = 1e-12
        pos, neg = a > eps, a < -eps
        with np.errstate(divide="ignore", invalid="ignore"):
            slope, icpt = -b / np.where(pos | neg, a, 1.0), -c / np.where(pos | neg, a, 1.0)
        s_lo, i_lo = np.where(pos, slope, 0.0), np.where(pos, icpt, -np.inf)
        s_hi, i_hi = np.where(neg, slope, 0.0), np.where(neg, icpt, np.inf)
        total = int(nrows.sum())
        prim = np.repeat(np.arange(len(a)), nrows)
        first = np.repeat(np.cumsum(nrows) - nrows, nrows)
        rows = rows0[prim] + (np.arange(total) - first)
        s_lo, i_lo, s_hi, i_hi, yl = s_lo[prim], i_lo[prim], s_hi[prim], i_hi[prim], ylim[prim]
        for k, (sx, sy) in enumerate(SAMPLE_POSITIONS[self.samples]):
            ys = rows + sy
            lo = np.max(s_lo * ys[:, None] + i_lo, axis=1)
            hi = np.min(s_hi * ys[:, None] + i_hi, axis=1)
            ok = (ys >= yl[:, 0]) & (ys <= yl[:, 1])
            i0 = np.maximum(np.ceil(lo - sx), 0)
            i1 = np.minimum(np.floor(hi - sx), self.width - 1)
            counts = np.where(ok & (i1 >= i0), i1 - i0 + 1, 0).astype(np.int64)
            self._fragments(counts, i0.astype(np.int64), rows, ys, sx, k, prim, depth, order, capsule)

    def _fragments(self, counts, i0, rows, ys, sx, k, prim, depth, order, capsule):
        keep = np.nonzero(counts)[0]
        if keep.size == 0:
            return
        counts, i0, rows, ys, prim = counts[keep], i0[keep], rows[keep], ys[keep], prim[keep]
        cum = np.cumsum(counts)
        start = 0
        while start < len(counts):
            base = cum[start - 1] if start else 0
            stop = max(int(np.searchsorted(cum, base + _FRAG_CHUNK, side="right")), start + 1)
            sl = slice(start, stop)
            self._test(counts[sl], i0[sl], rows[sl], ys[sl], sx, k, prim[sl], depth, order, capsule)
            start = stop

    def _test(self, counts, i0, rows, ys, sx, k, prim, depth, order, capsule):
        total = int(counts.sum())
        self.fragments += total
        row_of = np.repeat(np.arange(len(counts)), counts)
        cols = np.repeat(i0 - (np.cumsum(counts) - counts), counts) + np.arange(total)
        xs = cols + sx
        dp = depth[prim]
        if capsule:  # d0, d1-d0, t0, tx, ty: depth = d0 + clamp(t, 0, 1) * (d1 - d0)
            t_row = dp[:, 2] + dp[:, 4] * ys
            t = t_row[row_of] + dp[row_of, 3] * xs
            z = dp[row_of, 0] + np.clip(t, 0.0, 1.0) * dp[row_of, 1]
        else:  # z0, zx, zy
            z_row = dp[:, 0] + dp[:, 2] * ys
            z = z_row[row_of] + dp[row_of, 1] * xs
        zq = np.floor(z * ((1 << _DEPTH_BITS) - 1) / DEPTH_MAX + 0.5)
        ok = (z >= 0.0) & (zq < _DEPTH_CLEAR)
        if not ok.all():
            row_of, cols, zq = row_of[ok], cols[ok], zq[ok]
        key = (zq.astype(np.int64) << _ORDER_BITS) | order[prim][row_of]
        sample = (rows[row_of] * self.width + cols) * self.samples + k
        np.minimum.at(self.zbuf, sample, key)

    # ------------------------------------------------------------------------------------------------ output
    def resolve(self) -> np.ndarray:
        """uint8 (H, W, 3): colour of each covered sample at its pixel centre, 8-bit, averaged over samples."""
        n_pix, n_s = self.height * self.width, self.samples
        if not self._params:
            return np.zeros((self.height, self.width, 3), np.uint8)
        params = np.concatenate(self._params)
        z = self.zbuf.reshape(n_pix, n_s)
        covered = z != _EMPTY
        prim = z & _ORDER_MASK
        # pixels whose samples all show one primitive: one evaluation (the usual case inside shapes)
        uniform = covered.all(axis=1) & (prim == prim[:, :1]).all(axis=1)
        pix_u = np.nonzero(uniform)[0]
        mixed = covered & ~uniform[:, None]
        pix_m, smp_m = np.nonzero(mixed)
        pix = np.concatenate([pix_u, pix_m])
        weight = np.concatenate([np.full(len(pix_u), float(n_s)), np.ones(len(pix_m))])
        par = params[np.concatenate([prim[pix_u, 0], prim[pix_m, smp_m]])]
        xc = (pix % self.width) + 0.5
        yc = (pix // self.width) + 0.5
        t = np.clip(par[:, 12] + par[:, 13] * xc + par[:, 14] * yc, 0.0, 1.0)
        out = np.empty((self.height, self.width, 3), np.uint8)
        for ch in range(3):
            col = par[:, ch] + par[:, 3 + ch] * xc + par[:, 6 + ch] * yc + par[:, 9 + ch] * t
            level = np.floor(np.clip(col, 0.0, 1.0) * 255.0 + 0.5)  # 8-bit colour buffer
            total = np.bincount(pix, weights=level * weight, minlength=n_pix)
            out[..., ch] = np.floor(total / n_s + 0.5).reshape(self.height, self.width)  # MSAA resolve
        return out
