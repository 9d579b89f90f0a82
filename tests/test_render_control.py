"""`tools/render_control.py` against the reference renderer's own frames (tests/fixtures/control_render/caseA) and
every bad-input path of the CLI.

The comparison follows the oracle's README: pixels are labelled by colour *direction* (depth fading and
anti-aliasing against black keep it), then per element class a 1-px-tolerant F1 (>= 0.94 large, >= 0.80 small
classes), the drawn-area ratio (0.85-1.18), the mean colour error inside both renders (<= 5 levels) and the best
aligning shift (within +-1 px). It is checked to fail for a 2-px shift, 1.5x line widths, no depth fading, a wrong
class colour and a missing element type.
"""

import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from tests.conftest import REPO, fixtures_dir

CASE = fixtures_dir() / "control_render" / "caseA"
TOOL = str(REPO / "tools" / "render_control.py")
WIDE, TELE = "camera_front_wide_120fov", "camera_front_tele_30fov"


# ------------------------------------------------------------------------------------------------ the comparison
def _grad(a, b, n=17):
    return [(1 - s) * np.asarray(a, float) + s * np.asarray(b, float) for s in np.linspace(0, 1, n)]


CLASSES = {  # colour directions of each element class (v3 palettes; box faces: their gradient)
    "white_line_edge_unknown_light": [(255, 255, 255)],
    "yellow_line": [(255, 255, 0)], "other_line": [(181, 164, 71)], "road_boundary": [(253, 1, 232)],
    "wait_line": [(108, 179, 59)], "pole": [(183, 69, 177)], "crosswalk": [(139, 93, 255)],
    "road_marking": [(20, 254, 185)], "sign": [(8, 2, 255)], "light_red": [(240, 50, 50)],
    "light_yellow": [(255, 200, 0)], "light_green": [(130, 240, 132)],
    "box_car": _grad((0, 46, 136), (126, 206, 255)), "box_truck": _grad((204, 55, 0), (255, 192, 64)),
    "box_pedestrian": _grad((148, 0, 62), (255, 124, 171)), "box_cyclist": _grad((0, 80, 66), (102, 208, 198)),
    "box_others": _grad((53, 26, 20), (166, 136, 125)),
}
NAMES = list(CLASSES)
_DIRS = np.concatenate([np.asarray(v, float) / np.linalg.norm(v, axis=1, keepdims=True) for v in CLASSES.values()])
_OWNER = np.concatenate([[k] * len(v) for k, v in enumerate(CLASSES.values())])


def label(frames, min_norm=20.0, max_angle_deg=8.0):
    """Class index per pixel by nearest colour direction; -1 for dark or in-between (mixed) pixels."""
    packed = (frames[..., 0].astype(np.int32) << 16) | (frames[..., 1].astype(np.int32) << 8) | frames[..., 2]
    colors, inverse = np.unique(packed, return_inverse=True)  # label each distinct colour once
    rgb = np.stack([colors >> 16, (colors >> 8) & 255, colors & 255], axis=1).astype(np.float64)
    norm = np.linalg.norm(rgb, axis=1)
    cos = (rgb @ _DIRS.T) / np.maximum(norm, 1e-9)[:, None]
    best = np.argmax(cos, axis=1)
    ok = (norm >= min_norm) & (cos[np.arange(len(best)), best] >= np.cos(np.radians(max_angle_deg)))
    return np.where(ok, _OWNER[best], -1)[inverse].reshape(packed.shape)


def _dilate(m):
    out = m.copy()
    out[..., 1:, :] |= m[..., :-1, :]
    out[..., :-1, :] |= m[..., 1:, :]
    res = out.copy()
    res[..., 1:] |= out[..., :-1]
    res[..., :-1] |= out[..., 1:]
    return res


def _shift(a, dy, dx):
    out = np.full_like(a, -1)
    h, w = a.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def compare(ours, expected, large_px=1500):
    """{class: metrics} and the best aligning (dy, dx) of two uint8 [T, H, W, 3] renders."""
    lo, le = label(ours), label(expected)
    report = {}
    for k, name in enumerate(NAMES):
        e, o = le == k, lo == k
        ne, no = int(e.sum()), int(o.sum())
        if ne < 30 and no < 30:
            continue
        prec = (o & _dilate(e)).sum() / max(no, 1)
        rec = (e & _dilate(o)).sum() / max(ne, 1)
        inner = ~_dilate(~e) & ~_dilate(~o)
        err = float(np.abs(ours[inner].astype(int) - expected[inner].astype(int)).mean()) if inner.any() else 0.0
        report[name] = dict(expected_px=ne, ours_px=no, f1=float(2 * prec * rec / max(prec + rec, 1e-12)),
                            iou=float((e & o).sum() / max((e | o).sum(), 1)),  # strict, for information
                            area=no / max(ne, 1), color_err=err, large=ne >= large_px)
    scores = {(dy, dx): int(((_shift(lo, dy, dx) == le) & (le >= 0)).sum())
              for dy in range(-2, 3) for dx in range(-2, 3)}
    return report, max(scores, key=lambda s: (scores[s], -abs(s[0]) - abs(s[1])))  # ties: the smallest shift


def failures(report, shift):
    bad = []
    for name, r in report.items():
        if r["expected_px"] < 30:
            bad += [f"{name}: {r['ours_px']} px drawn, the reference has none"] if r["ours_px"] > 300 else []
            continue
        thr = 0.94 if r["large"] else 0.80
        if r["f1"] < thr:
            bad.append(f"{name}: F1 {r['f1']:.3f} < {thr}")
        if r["expected_px"] >= 300 and not 0.85 <= r["area"] <= 1.18:
            bad.append(f"{name}: drawn-area ratio {r['area']:.3f}")
        if r["color_err"] > 5.0:
            bad.append(f"{name}: interior colour error {r['color_err']:.2f}")
    if max(abs(shift[0]), abs(shift[1])) > 1:
        bad.append(f"best aligning shift {shift}")
    return bad


# ------------------------------------------------------------------------------------------------ the oracle
def _run(*args, timeout=300):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))


ORACLES = sorted(p for p in (fixtures_dir() / "control_render").glob("case*") if (p / "case.json").is_file())
_RUNS: dict = {}


def _render_case(case_dir, tmp_path_factory):
    """The contract run, once per oracle: tools/render_control.py <case>/scene OUT --cameras ... --raw --preview
    (the scene folder renamed: the name comes from the pose tar)."""
    if case_dir not in _RUNS:
        case = json.loads((case_dir / "case.json").read_text())
        scene = tmp_path_factory.mktemp("scene") / "some_other_folder_name"
        shutil.copytree(case_dir / "scene", scene)
        out = tmp_path_factory.mktemp("out")
        res = _run(scene, out, "--cameras", ",".join(case["cameras"]), "--raw", "--preview")
        assert res.returncode == 0, res.stderr
        with np.load(case_dir / "expected.npz") as z:
            expected = {k: z[k] for k in z.files}
        raw = {cam: np.load(out / "raw" / f"{cam}.npy") for cam in case["cameras"]}
        _RUNS[case_dir] = (out, raw, case, expected)
    return _RUNS[case_dir]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return _render_case(CASE, tmp_path_factory)[2]


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    return _render_case(CASE, tmp_path_factory)[3]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return _render_case(CASE, tmp_path_factory)[:2]


@pytest.mark.parametrize("case_dir", ORACLES, ids=[p.name for p in ORACLES])
def test_oracle(case_dir, tmp_path_factory):
    """Every oracle folder (caseA is shipped; others of the same format are picked up when present)."""
    _, raw, case, expected = _render_case(case_dir, tmp_path_factory)
    for cam in case["cameras"]:
        assert raw[cam].shape == tuple(case["expected"][cam]["shape"]) and raw[cam].dtype == np.uint8
        report, shift = compare(raw[cam], expected[cam])
        assert not failures(report, shift), (cam, failures(report, shift), report)
        nonzero = (raw[cam].max(-1) > 0).sum(axis=(1, 2))
        assert np.allclose(nonzero, case["expected"][cam]["nonzero_px_per_frame"], rtol=0.02, atol=200)
        if case_dir == CASE:  # every element type is present in caseA and compared, at the same place
            assert shift == (0, 0) and len(report) >= 14 and sum(r["large"] for r in report.values()) >= 10


def test_outputs_layout_and_video(rendered, case):
    from cosmos_jax.data import video
    out, raw = rendered
    for cam in case["cameras"]:
        path = out / "control_input_hdmap_bbox" / f"ftheta_{cam}" / f"{case['clip_id']}.mp4"
        info = video.probe(path)
        assert (info.num_frames, info.height, info.width) == (case["frames"], 720, 1280)
        assert info.fps == pytest.approx(30.0)
        first = video.read_frames(path, [0])[0].astype(int)
        assert np.abs(first - raw[cam][0]).mean() < 3.0  # H.264 crf 18 of the same frame
    grid = video.probe(out / "preview" / f"{case['clip_id']}.mp4")
    assert (grid.num_frames, grid.height, grid.width) == (case["frames"], 720, 1278)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_comparison_catches_wrong_renders(rendered, expected):
    """The metric must be able to fail: shifted, recoloured, incomplete, too-thick and unfaded renders."""
    from cosmos_jax.worldscenario import raster, rdshq, render
    _, raw = rendered
    ours, ref = raw[TELE], expected[TELE]
    assert failures(*compare(np.roll(ours, 2, axis=2), ref))  # 2-px shift
    recolour = ours.copy()
    lab = label(ours)
    recolour[lab == NAMES.index("road_boundary")] = (183, 69, 177)  # boundaries in the pole colour
    assert any("road_boundary" in f for f in failures(*compare(recolour, ref)))
    missing = ours.copy()
    missing[lab == NAMES.index("box_car")] = 0
    assert any("box_car" in f for f in failures(*compare(missing, ref)))
    # renders with a wrong model, one frame
    scene = rdshq.load_scene(str(CASE / "scene"), [TELE])
    t = render.frame_times(scene)[:1]
    thick = render.RenderOptions(line_scale=1.5)
    frame = render.render_camera(scene, TELE, t, render.prepare_static(scene), thick)
    assert any("area ratio" in f for f in failures(*compare(frame, ref[:1])))
    orig = raster.depth_fade
    try:
        raster.depth_fade = lambda color, depth: np.broadcast_to(
            np.asarray(color, float), np.shape(depth) + (3,)).copy()
        flat = render.render_camera(scene, TELE, t, render.prepare_static(scene), render.RenderOptions())
    finally:
        raster.depth_fade = orig
    assert any("colour error" in f for f in failures(*compare(flat, ref[:1])))


def test_direct_camera_poses_and_fixed_mode(tmp_path, expected):
    """Without vehicle_pose/ the per-camera poses are used directly (PR #139); --compat fixed still renders."""
    from cosmos_jax.worldscenario import rdshq, render
    scene_dir = tmp_path / "scene"
    shutil.copytree(CASE / "scene", scene_dir)
    shutil.rmtree(scene_dir / "vehicle_pose")
    scene = rdshq.load_scene(str(scene_dir), [TELE])
    assert scene.ego_poses is None
    t = render.frame_times(scene)[:1]
    frame = render.render_camera(scene, TELE, t, render.prepare_static(scene), render.RenderOptions())
    assert not failures(*compare(frame, expected[TELE][:1]))
    fixed = render.RenderOptions(compat="fixed")
    frame = render.render_camera(scene, TELE, t, render.prepare_static(scene, "fixed"), fixed)
    lab = label(frame)
    assert (lab == NAMES.index("box_truck")).sum() > 1000  # trucks and buses in the Truck colour


# ------------------------------------------------------------------------------------------------ bad inputs
def _rewrite(tar_path, edit):
    """Rewrite a tar's members through edit(suffix, bytes) -> bytes | None (dropped)."""
    with tarfile.open(tar_path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    with tarfile.open(tar_path, "w") as tf:
        for name, data in members:
            new = edit(name.split(".", 1)[1], data)
            if new is not None:
                info = tarfile.TarInfo(name)
                info.size = len(new)
                tf.addfile(info, io.BytesIO(new))


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture()
def scene_copy(tmp_path, case):
    path = tmp_path / "clip"
    shutil.copytree(CASE / "scene", path)
    return path, case["clip_id"]


def _one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


FAST = ("--max-frames", "1", "--samples", "1", "--quiet")


def test_missing_camera_and_paths(tmp_path, scene_copy):
    scene, _ = scene_copy
    _one_line_error(_run(scene, tmp_path / "o", "--cameras", f"{TELE},camera_side_fisheye", *FAST),
                    "camera_side_fisheye", "not in the rig", TELE)
    _one_line_error(_run(tmp_path / "nope", tmp_path / "o", *FAST), "no such directory")
    (tmp_path / "empty").mkdir()
    _one_line_error(_run(tmp_path / "empty", tmp_path / "o", *FAST), "not an RDS-HQ clip")
    _one_line_error(_run(scene, tmp_path / "o", "--cameras", TELE, "--max-frames", "0"), "--max-frames")
    _one_line_error(_run(scene, tmp_path / "o", "--cameras", TELE, "--fps", "0"), "--fps")
    res = _run(scene, tmp_path / "o", "--cameras", "camera_side_fisheye", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr
    assert not (tmp_path / "o" / "control_input_hdmap_bbox").exists()  # nothing written on errors


def test_broken_files(tmp_path, scene_copy):
    scene, clip = scene_copy
    vp = scene / "vehicle_pose" / f"{clip}.tar"
    _rewrite(vp, lambda s, d: _npy(np.full((4, 4), np.nan)) if s.startswith("000001") else d)
    _one_line_error(_run(scene, tmp_path / "o", "--cameras", TELE, *FAST), "vehicle_pose", "000001", "NaN")
    shutil.rmtree(scene)
    shutil.copytree(CASE / "scene", scene)
    (scene / "3d_lanelines" / f"{clip}.tar").write_bytes(b"not a tar at all")
    _one_line_error(_run(scene, tmp_path / "o", "--cameras", TELE, *FAST), "3d_lanelines", "not a readable tar")
    shutil.copy(scene / "pose" / f"{clip}.tar", scene / "pose" / "another_clip.tar")
    _one_line_error(_run(scene, tmp_path / "o", "--cameras", TELE, *FAST), "--clip-id")
    intr = scene / "ftheta_intrinsic" / f"{clip}.tar"
    _rewrite(intr, lambda s, d: _npy(np.ones(5)) if TELE in s else d)
    _one_line_error(_run(scene, tmp_path / "o", "--cameras", TELE, "--clip-id", clip, *FAST),
                    "ftheta_intrinsic", TELE)


def test_degenerate_elements_warn_and_render(tmp_path, scene_copy):
    """NaN rows, an empty track, a one-observation track (the reference crashes), a flat crosswalk, a flat sign,
    an unknown light state: each a warning naming the element; the clip still renders."""
    scene, clip = scene_copy

    def edit_json(attr, fn):
        _rewrite(scene / attr / f"{clip}.tar", lambda s, d: json.dumps(fn(s, json.loads(d))).encode()
                 if s.endswith(".json") else d)

    def lanelines(_, d):
        d["labels"][1]["labelData"]["shape3d"]["polyline3d"]["vertices"][3] = [float("nan"), 0.0, 0.0]
        return d

    def crosswalks(_, d):
        d["labels"][0]["labelData"]["shape3d"]["surface"]["vertices"] = [[20, 0, 0], [21, 1, 0], [22, 2, 0]]
        return d

    def signs(_, d):
        d["labels"][0]["labelData"]["shape3d"]["cuboid3d"]["vertices"] = [[18, -8, 4]] * 8
        return d

    def states(_, d):
        d["traffic_light_states"]["light_0"]["state"][0] = "BLINKING_PURPLE"
        return d

    def objects(suffix, d):
        d["lead_car"]["object_to_world"][0][3] = float("nan")  # lead_car: no valid observation at all
        if not suffix.startswith("000000"):
            d.pop("deer", None)  # deer: a single observation
        return d

    edit_json("3d_lanelines", lanelines)
    edit_json("3d_crosswalks", crosswalks)
    edit_json("3d_traffic_signs", signs)
    edit_json("3d_traffic_lights_status", states)
    edit_json("all_object_info", objects)
    out = tmp_path / "o"
    res = _run(scene, out, "--cameras", "camera:front:tele:30fov", "--name", "clip7", *FAST)
    assert res.returncode == 0, res.stderr
    warn = res.stderr
    assert "3d_lanelines" in warn and "label 1" in warn and "NaN" in warn
    assert "3d_crosswalks[0]" in warn and "one line" in warn
    assert "3d_traffic_signs" in warn and "label 0" in warn
    assert "BLINKING_PURPLE" in warn
    assert "lead_car" in warn
    assert "Traceback" not in warn
    assert (out / "control_input_hdmap_bbox" / f"ftheta_{TELE}" / "clip7.mp4").is_file()


def test_fps_resampling_and_sample_dataset_route(tmp_path):
    """--fps resamples the clip's timeline; make_sample_dataset renders its controls with this renderer."""
    from cosmos_jax.data import video
    from cosmos_jax.worldscenario import rdshq, render
    from tools import make_sample_dataset

    scene = rdshq.load_scene(str(CASE / "scene"), [TELE])
    assert np.allclose(render.frame_times(scene, 20.0), [0, 50000])
    assert np.array_equal(render.frame_times(scene), scene.timestamps) and len(render.frame_times(scene, None, 2)) == 2
    mid = scene.camera_to_world(TELE, np.array([50000.0]))[0]  # between source frames 1 and 2
    ends = scene.camera_to_world(TELE, scene.timestamps[1:].astype(float))
    assert np.allclose(mid[:3, 3], ends[:, :3, 3].mean(axis=0), atol=2e-3)
    cams = ("camera_front_wide_120fov", "camera_rear_tele_30fov")
    make_sample_dataset.make_dataset(str(tmp_path), samples=1, frames=2, height=48, width=80, cameras=cams,
                                     control="worldscenario")
    for cam in cams:
        ctrl = video.read_frames(tmp_path / "control_input_hdmap_bbox" / f"ftheta_{cam}" / "synthetic_0000.mp4")
        rgb = video.read_frames(tmp_path / "videos" / f"ftheta_{cam}" / "synthetic_0000.mp4")
        assert ctrl.shape == rgb.shape == (2, 48, 80, 3)
        assert (ctrl.max(-1) > 40).mean() > 0.02 and (ctrl.max(-1) < 10).mean() > 0.5  # lines on black
    with pytest.raises(ValueError):
        make_sample_dataset.make_dataset(str(tmp_path), samples=1, control="bogus")
