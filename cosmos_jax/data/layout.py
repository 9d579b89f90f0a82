"""The reference dataset layout: index, validation, and one training sample built exactly as the reference does.

```
DATASET/captions/ftheta_camera_front_wide_120fov/<name>.json          {"caption": "..."}
DATASET/videos/ftheta_<camera>/<name>.mp4                             one per camera
DATASET/control_input_hdmap_bbox/ftheta_<camera>/<name>.mp4           one per camera (HDMap / world-scenario renders)
```
Samples are the caption stems (`dataloader_local.py`), matched across folders by file stem. A sample is frames
0, s, 2s, ... (29 of them) of every view at native fps, each resized (antialiased bilinear) to 720x1280, uint8,
views concatenated in camera order (view-major frames), with per-frame view ids and the 7 per-view caption strings
(camera prefix + caption on the front view, prefix only elsewhere) - `predict2_multiview/datasets/multiview.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import numpy as np

from cosmos_jax import cameras as cams
from cosmos_jax.data import video

VIDEO_DIR, CONTROL_DIR, CAPTION_DIR = "videos", "control_input_hdmap_bbox", "captions"


class DatasetError(ValueError):
    """A dataset problem; the message names the offending file."""


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """How samples are cut: cameras (order = position in the sample), their view ids, frames, size."""

    cameras: tuple[str, ...] = cams.CAMERAS
    view_ids: tuple[int, ...] | None = None  # default: index of each camera in cams.CAMERAS (the base model's rig)
    num_frames: int = 29
    stride: int = 1  # fps_downsample_factor
    height: int = 720
    width: int = 1280
    caption_camera: str = cams.CAPTION_CAMERA

    def __post_init__(self):
        if self.view_ids is None:
            unknown = [c for c in self.cameras if c not in cams.CAMERAS]
            if unknown:
                raise ValueError(f"cameras {unknown} are not in the base rig {cams.CAMERAS}: give view_ids mapping "
                                 "each to the closest base-model camera (its view id 0-6)")
            object.__setattr__(self, "view_ids", tuple(cams.CAMERAS.index(c) for c in self.cameras))
        if len(self.view_ids) != len(self.cameras):
            raise ValueError("SampleSpec.view_ids needs one id per camera")
        if self.caption_camera not in self.cameras:
            raise ValueError(f"caption camera {self.caption_camera} is not among the cameras {self.cameras}")

    @property
    def frame_indices(self) -> list[int]:
        return list(range(0, self.num_frames * self.stride, self.stride))


@dataclasses.dataclass(frozen=True)
class SampleFiles:
    name: str
    caption_path: str
    videos: tuple[str, ...]    # per camera, in SampleSpec.cameras order
    controls: tuple[str, ...]


def _paths(root: str, name: str, spec: SampleSpec) -> SampleFiles:
    return SampleFiles(
        name=name,
        caption_path=os.path.join(root, CAPTION_DIR, f"ftheta_{spec.caption_camera}", f"{name}.json"),
        videos=tuple(os.path.join(root, VIDEO_DIR, f"ftheta_{c}", f"{name}.mp4") for c in spec.cameras),
        controls=tuple(os.path.join(root, CONTROL_DIR, f"ftheta_{c}", f"{name}.mp4") for c in spec.cameras))


def read_caption(path: str) -> str:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable caption JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("caption"), str):
        raise DatasetError(f"{path}: no string field \"caption\"")
    return data["caption"]


def _caption_names(root: str, spec: SampleSpec) -> tuple[str, list[str]]:
    """(caption folder, sorted sample names): a sample is a caption stem (dataloader_local.py)."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: {'not a directory' if os.path.exists(root) else 'no such dataset directory'}")
    cap_dir = os.path.join(root, CAPTION_DIR, f"ftheta_{spec.caption_camera}")
    if not os.path.isdir(cap_dir):
        raise DatasetError(f"{cap_dir}: missing (the caption folder of the dataset)")
    return cap_dir, sorted(f[:-5] for f in os.listdir(cap_dir) if f.endswith(".json"))


def check_sample(files: SampleFiles, spec: SampleSpec, *, probe: bool = True) -> list[str]:
    """Every problem of one sample (empty when usable), each naming its file."""
    problems = []
    try:
        read_caption(files.caption_path)
    except DatasetError as e:
        problems.append(str(e))
    for path in files.videos + files.controls:
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
    if problems or not probe:
        return problems
    need = spec.frame_indices[-1] + 1
    infos = {}
    for path in files.videos + files.controls:
        try:
            infos[path] = info = video.probe(path)
        except video.VideoError as e:
            problems.append(str(e))
            continue
        if info.num_frames < need:
            problems.append(f"{path}: {info.num_frames} frames, the sample needs {need} "
                            f"({spec.num_frames} frames at stride {spec.stride})")
    ref = infos.get(files.videos[0])
    if ref is not None:
        for path, info in infos.items():
            if abs(info.fps - ref.fps) > 1e-3:
                what = "control video" if path in files.controls else "video"
                problems.append(f"{path}: {what} fps {info.fps:g} differs from {files.videos[0]} ({ref.fps:g})")
    return problems


def index_dataset(root: str | os.PathLike, spec: SampleSpec = SampleSpec(), *, skip_bad: bool = False,
                  probe: bool = True) -> list[SampleFiles]:
    """Samples of the dataset (sorted by name); the first problem raises DatasetError, or with skip_bad the
    sample is skipped with a warning. `probe` opens every video (fps, length, decodability)."""
    root = os.fspath(root)
    cap_dir, names = _caption_names(root, spec)
    if not names:
        raise DatasetError(f"{cap_dir}: no caption .json files")
    samples = []
    for name in names:
        files = _paths(root, name, spec)
        problems = check_sample(files, spec, probe=probe)
        if problems:
            if not skip_bad:
                raise DatasetError(problems[0] + (f" (+{len(problems) - 1} more problems in sample {name})"
                                                  if len(problems) > 1 else ""))
            warnings.warn(f"skipping sample {name}: " + "; ".join(problems), stacklevel=2)
            continue
        samples.append(files)
    if not samples:
        raise DatasetError(f"{root}: no usable samples")
    return samples


def validate(root: str | os.PathLike, spec: SampleSpec = SampleSpec()) -> tuple[int, dict[str, list[str]]]:
    """(number of samples, {sample name: problems}) for the whole dataset; never raises on sample problems."""
    root = os.fspath(root)
    try:
        cap_dir, names = _caption_names(root, spec)
    except DatasetError as e:
        return 0, {"<dataset>": [str(e)]}
    bad = {}
    for name in names:
        problems = check_sample(_paths(root, name, spec), spec)
        if problems:
            bad[name] = problems
    # videos without a caption are never used: say so
    for kind in (VIDEO_DIR, CONTROL_DIR):
        for cam in spec.cameras:
            folder = os.path.join(root, kind, f"ftheta_{cam}")
            if os.path.isdir(folder):
                for f in sorted(os.listdir(folder)):
                    if f.endswith(".mp4") and f[:-4] not in names:
                        bad.setdefault(f[:-4], []).append(f"{os.path.join(folder, f)}: no caption "
                                                          f"{os.path.join(cap_dir, f[:-4] + '.json')}")
    return len(names), bad


def read_view(path: str, spec: SampleSpec = SampleSpec(), *, threads: int = 0, chunk: int = 8) -> np.ndarray:
    """One view (video or control) of a sample: frames `spec.frame_indices` resized to spec.height x spec.width,
    uint8 (T, H, W, 3). The resize runs `chunk` frames at a time, so its float32 intermediates stay small."""
    frames = video.read_frames(path, spec.frame_indices, threads=threads)
    size = (spec.height, spec.width)
    if frames.shape[1:3] == size:
        return frames
    out, chunk = np.empty((len(frames),) + size + (3,), np.uint8), max(1, chunk)
    for i in range(0, len(frames), chunk):
        out[i:i + chunk] = video.resize(frames[i:i + chunk], size)
    return out


def sample_info(files: SampleFiles, spec: SampleSpec = SampleSpec()) -> dict:
    """Everything of `load_sample` except the frames (no decoding; the videos are probed for their fps, which must
    agree across views and controls)."""
    caption = read_caption(files.caption_path)
    fps = None
    for path in files.videos + files.controls:
        info = video.probe(path)
        if fps is None:
            fps = info.fps
        elif abs(info.fps - fps) > 1e-3:
            raise DatasetError(f"{path}: fps {info.fps:g} differs from {files.videos[0]} ({fps:g})")
    v = len(spec.cameras)
    return {
        "view_indices": np.repeat(np.asarray(spec.view_ids, np.int32), spec.num_frames),
        "view_indices_selection": np.asarray(spec.view_ids, np.int32),
        "ai_caption": np.asarray(cams.training_view_captions(caption, spec.view_ids,
                                                             spec.cameras.index(spec.caption_camera))),
        "frame_indices": np.asarray(spec.frame_indices, np.int32),
        "num_video_frames_per_view": np.int32(spec.num_frames),
        "sample_n_views": np.int32(v),
        "fps": np.float32(fps / spec.stride),
        "padding_mask": np.zeros((1, spec.height, spec.width), np.float32),
        "__key__": np.asarray(files.name),
    }


def load_sample(files: SampleFiles, spec: SampleSpec = SampleSpec(), *, threads: int = 0) -> dict:
    """One training sample, as the reference's dataset yields it (channels-last):

    video, control_input_hdmap_bbox: uint8 (V*T, H, W, 3), view-major; view_indices: int32 (V*T,);
    view_indices_selection: int32 (V,); ai_caption: V strings; frame_indices (T,); fps; padding_mask
    float32 (1, H, W) zeros; __key__.
    """
    info = sample_info(files, spec)
    streams = {kind: np.concatenate([read_view(p, spec, threads=threads) for p in paths], axis=0)
               for kind, paths in (("video", files.videos), ("control_input_hdmap_bbox", files.controls))}
    return {"video": streams["video"], "control_input_hdmap_bbox": streams["control_input_hdmap_bbox"], **info}
