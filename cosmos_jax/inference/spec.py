"""The reference's multiview inference spec (`MultiviewInferenceArguments`), validated with errors that name the
spec file and the field, and the frame plan a sample's videos allow.

Format (`cosmos_transfer2/multiview_config.py` L53-188, `config.py` L311-381): a `.json` file holds one sample, a
`.jsonl` file one per line; unknown keys are errors; paths are relative to the spec file's directory and must
exist; sample names are unique over all files of a run.

    name                     str, required: the outputs' basename
    prompt | prompt_path     the prompt, or a text file holding it (read and stripped); `prompt` wins if both
    negative_prompt          str, accepted and ignored (the multiview pipeline always uses the built-in one)
    seed                     int, 0 (chunk c of autoregressive mode uses seed + c)
    guidance                 int in [0, 7], 3: v = v_cond + guidance * (v_cond - v_uncond)
    num_conditional_frames   int >= 0, 1: pixel frames per view taken from the input videos (-> 1 + (n-1)//4 latent)
    control_weight           float in [0, 1], 1.0
    fps                      int > 0, 10: every file has the same fps F, F % fps == 0, frames taken at stride F/fps
    num_steps                int >= 1, 35
    enable_autoregressive    bool, false; num_chunks int >= 1, 2; chunk_overlap int >= 0, 1 (pixel frames)
    save_combined_views      bool, true: one `<name>.mp4`; false: `<name>_<view>.mp4` + `<name>_grid.mp4`
    front_wide, cross_right, rear_right, rear, rear_left, cross_left, front_tele
                             {input_path, control_path, num_conditional_frames_per_view (0..5; AR only, in {0,1,5})}

A view is active iff it has a control path; active views keep their fixed order and view ids (front_wide=0 ...
front_tele=6) whatever subset is given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

from cosmos_jax import cameras as cams

# Spec keys of the seven views, in view-id order (= cameras.CAMERAS; `rear` is the rear tele camera).
VIEW_KEYS: tuple[str, ...] = ("front_wide", "cross_right", "rear_right", "rear", "rear_left", "cross_left",
                              "front_tele")
assert len(VIEW_KEYS) == len(cams.CAMERAS)
PRIMARY_VIEW = "front_wide"  # the view that gets the prompt (else the first active view)
VIEW_FIELDS = ("input_path", "control_path", "num_conditional_frames_per_view")
AR_CONDITIONAL_FRAMES = (0, 1, 5)

# Top-level fields and their defaults (reference order, which `<name>.json` keeps).
DEFAULTS: dict[str, Any] = {
    "name": None, "prompt_path": None, "prompt": None, "negative_prompt": None, "seed": 0, "guidance": 3,
    "num_conditional_frames": 1, "control_weight": 1.0, "fps": 10, "num_steps": 35, "enable_autoregressive": False,
    "num_chunks": 2, "chunk_overlap": 1, "save_combined_views": True,
}
# Fields a command line may override (the reference: every top-level field except the name and the view blocks).
OVERRIDABLE: tuple[str, ...] = tuple(k for k in DEFAULTS if k != "name")
_OPTIONAL = ("prompt", "prompt_path", "negative_prompt")  # the fields that may be null
_MAX_SEED = 2 ** 32 - 1  # np.random.RandomState's range


class SpecError(ValueError):
    """An invalid spec; the message starts with the spec file (and line) and names every bad field."""


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    input_path: str | None = None
    control_path: str | None = None
    num_conditional_frames_per_view: int = 0


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """One validated sample; paths are absolute."""
    name: str
    prompt: str
    prompt_path: str | None
    negative_prompt: str | None
    seed: int
    guidance: int
    num_conditional_frames: int
    control_weight: float
    fps: int
    num_steps: int
    enable_autoregressive: bool
    num_chunks: int
    chunk_overlap: int
    save_combined_views: bool
    views: dict[str, ViewSpec]
    source: str = ""  # "<spec file>" or "<spec file> line N", the prefix of every error about this sample

    @property
    def active_views(self) -> list[str]:
        """View keys with a control video, in the fixed view order."""
        return [k for k in VIEW_KEYS if self.views[k].control_path is not None]

    @property
    def view_ids(self) -> list[int]:
        return [VIEW_KEYS.index(k) for k in self.active_views]

    @property
    def primary(self) -> int:
        """Position (among the active views) of the view that carries the prompt."""
        active = self.active_views
        return active.index(PRIMARY_VIEW) if PRIMARY_VIEW in active else 0

    def conditional_frames(self) -> list[int]:
        """Pixel conditioning frames per active view for the first chunk: `num_conditional_frames`, or in
        autoregressive mode the per-view values when they are set (non-zero)."""
        per_view = [self.views[k].num_conditional_frames_per_view for k in self.active_views]
        if self.enable_autoregressive and any(per_view):
            return per_view
        return [self.num_conditional_frames] * len(per_view)

    def to_dict(self) -> dict:
        """The validated sample as the reference dumps it (`<name>.json`): every field, absolute paths."""
        out = {k: getattr(self, k) for k in DEFAULTS}
        for k in VIEW_KEYS:
            out[k] = dataclasses.asdict(self.views[k])
        return out


# ----------------------------------------------------------------------------------------------------------------
# Value checks: each returns the value or raises _Bad(message); the caller adds the field name.


class _Bad(Exception):
    pass


def _int(v) -> int:
    """An integer; integral floats and integer strings are accepted (as pydantic's lax mode), booleans are not."""
    if isinstance(v, bool):
        raise _Bad(f"expected an integer, got {json.dumps(v)}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise _Bad(f"expected an integer, got {v!r}")


def _float(v) -> float:
    if isinstance(v, bool):
        raise _Bad(f"expected a number, got {json.dumps(v)}")
    if isinstance(v, (int, float)):
        out = float(v)
    elif isinstance(v, str):
        try:
            out = float(v.strip())
        except ValueError:
            raise _Bad(f"expected a number, got {v!r}") from None
    else:
        raise _Bad(f"expected a number, got {v!r}")
    if not math.isfinite(out):
        raise _Bad(f"expected a finite number, got {v!r}")
    return out


_TRUE, _FALSE = ("true", "1", "yes", "on", "t", "y"), ("false", "0", "no", "off", "f", "n")


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise _Bad(f"expected true or false, got {v!r}")


def _str(v) -> str:
    if not isinstance(v, str):
        raise _Bad(f"expected a string, got {v!r}")
    return v


def _in_range(lo=None, hi=None):
    def check(x):
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            if lo is not None and hi is not None:
                raise _Bad(f"{x} is outside [{lo}, {hi}]")
            raise _Bad(f"{x} must be {'>= ' + str(lo) if lo is not None else '<= ' + str(hi)}")
        return x
    return check


def _file(base_dir: str):
    def check(v):
        p = _str(v)
        path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(p)))
        if not os.path.exists(path):
            raise _Bad(f"{path}: no such file")
        if not os.path.isfile(path):
            raise _Bad(f"{path}: not a file")
        return path
    return check


def _chain(*fns):
    def run(v):
        for fn in fns:
            v = fn(v)
        return v
    return run


def _name(v) -> str:
    s = _str(v)
    if not s or s in (".", "..") or "/" in s or os.sep in s or "\0" in s:
        raise _Bad(f"{v!r} is not a file name (the outputs are <output_dir>/<name>.mp4)")
    return s


_CHECKS: dict[str, Callable] = {
    "name": _name,
    "prompt": _str,
    "negative_prompt": _str,
    "seed": _chain(_int, _in_range(0, _MAX_SEED)),
    "guidance": _chain(_int, _in_range(0, 7)),
    "num_conditional_frames": _chain(_int, _in_range(0)),
    "control_weight": _chain(_float, _in_range(0.0, 1.0)),
    "fps": _chain(_int, _in_range(1)),
    "num_steps": _chain(_int, _in_range(1)),
    "enable_autoregressive": _bool,
    "num_chunks": _chain(_int, _in_range(1)),
    "chunk_overlap": _chain(_int, _in_range(0)),
    "save_combined_views": _bool,
}


# ----------------------------------------------------------------------------------------------------------------
# One sample


def validate_sample(data: Any, *, base_dir: str, source: str) -> SampleSpec:
    """A spec dict -> SampleSpec, or SpecError("<source>: field: problem; field: problem ...")."""
    errors: list[str] = []

    def bad(field: str, msg: str) -> None:
        errors.append(f"{field}: {msg}")

    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a JSON object (one sample), got {type(data).__name__}")
    for key in data:
        if key not in DEFAULTS and key not in VIEW_KEYS:
            bad(key, f"unknown field (fields: {', '.join(list(DEFAULTS) + list(VIEW_KEYS))})")

    values: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        if key == "prompt_path":
            continue
        raw = data.get(key, default)
        if raw is None:
            values[key] = None
            if key not in _OPTIONAL:
                bad(key, "missing (the outputs' basename)" if key == "name" else "null is not allowed")
            continue
        try:
            values[key] = _CHECKS[key](raw)
        except _Bad as e:
            bad(key, str(e))

    # prompt: `prompt` wins over `prompt_path` (reference validate_prompt)
    values["prompt_path"] = None
    if data.get("prompt_path") is not None:
        try:
            values["prompt_path"] = _file(base_dir)(data["prompt_path"])
        except _Bad as e:
            bad("prompt_path", str(e))
    if values.get("prompt") is None and values["prompt_path"] is not None:
        try:
            with open(values["prompt_path"], encoding="utf-8") as f:
                values["prompt"] = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            bad("prompt_path", f"{values['prompt_path']}: cannot read ({e})")
    if data.get("prompt") is None and data.get("prompt_path") is None:
        bad("prompt", "missing: give prompt or prompt_path")

    views: dict[str, ViewSpec] = {}
    for key in VIEW_KEYS:
        block = data.get(key)
        if block is None:
            views[key] = ViewSpec()
            continue
        if not isinstance(block, dict):
            bad(key, f"expected an object with {', '.join(VIEW_FIELDS)}, got {block!r}")
            views[key] = ViewSpec()
            continue
        kw: dict[str, Any] = {}
        for f in block:
            if f not in VIEW_FIELDS:
                bad(f"{key}.{f}", f"unknown field (view fields: {', '.join(VIEW_FIELDS)})")
        for f in ("input_path", "control_path"):
            if block.get(f) is not None:
                try:
                    kw[f] = _file(base_dir)(block[f])
                except _Bad as e:
                    bad(f"{key}.{f}", str(e))
        if block.get("num_conditional_frames_per_view") is not None:
            try:
                kw["num_conditional_frames_per_view"] = _chain(_int, _in_range(0, 5))(
                    block["num_conditional_frames_per_view"])
            except _Bad as e:
                bad(f"{key}.num_conditional_frames_per_view", str(e))
        views[key] = ViewSpec(**kw)

    # cross-field rules (reference validate_input_paths); a view whose control path is bad still counts as active
    given = [k for k in VIEW_KEYS if isinstance(data.get(k), dict) and data[k].get("control_path") is not None]
    active = [k for k in VIEW_KEYS if views[k].control_path is not None]
    if not given:
        bad("control_path", f"no active view: give a control_path in at least one of {', '.join(VIEW_KEYS)}")
    ar = values.get("enable_autoregressive") or False
    per_view = [views[k].num_conditional_frames_per_view for k in active]
    if ar:
        wrong = [k for k in active if views[k].num_conditional_frames_per_view not in AR_CONDITIONAL_FRAMES]
        for k in wrong:
            bad(f"{k}.num_conditional_frames_per_view",
                f"{views[k].num_conditional_frames_per_view} is not one of {list(AR_CONDITIONAL_FRAMES)} "
                "(autoregressive mode)")
        if any(per_view) and not all(per_view):
            zero = [k for k in active if not views[k].num_conditional_frames_per_view]
            bad(f"{zero[0]}.num_conditional_frames_per_view",
                "0 while other active views set it: set it for every active view or for none (autoregressive mode)")
    n_cond = values.get("num_conditional_frames") or 0
    needs_input = (any(per_view) if ar and any(per_view) else n_cond > 0)
    if needs_input:
        for k in active:
            if views[k].input_path is None and not any(e.startswith(f"{k}.input_path") for e in errors):
                bad(f"{k}.input_path", "missing: the active views need input videos for their conditioning frames "
                                       "(or set num_conditional_frames to 0)")

    if errors:
        raise SpecError(f"{source}: " + "; ".join(errors))
    return SampleSpec(**values, views=views, source=source)


# ----------------------------------------------------------------------------------------------------------------
# Files


def read_spec_file(path: str | os.PathLike, overrides: dict | None = None) -> list[SampleSpec]:
    """The samples of one `.json` / `.jsonl` spec, each merged with `overrides` (command-line values of top-level
    fields; a command-line prompt or prompt_path replaces both of the file's) and validated."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise SpecError(f"{path}: no such spec file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".jsonl"):
        raise SpecError(f"{path}: unsupported spec file extension {ext!r} (expected .json or .jsonl)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read ({e})") from None
    entries: list[tuple[str, str]] = []
    if ext == ".json":
        entries.append((path, text))
    else:
        entries += [(f"{path} line {i}", line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not entries:
            raise SpecError(f"{path}: no samples (empty file)")
    overrides = dict(overrides or {})
    out = []
    for source, chunk in entries:
        try:
            data = json.loads(chunk)
        except json.JSONDecodeError as e:
            raise SpecError(f"{source}: not valid JSON ({e})") from None
        if isinstance(data, dict) and overrides:
            if "prompt" in overrides or "prompt_path" in overrides:
                data = {k: v for k, v in data.items() if k not in ("prompt", "prompt_path")}
            data = {**data, **overrides}
        out.append(validate_sample(data, base_dir=os.path.dirname(path), source=source))
    return out


def load_specs(paths: Sequence[str | os.PathLike], overrides: dict | None = None) -> list[SampleSpec]:
    """All samples of the spec files in order; sample names must be unique over all of them."""
    if not paths:
        raise SpecError("no spec file given (--spec FILE.json|FILE.jsonl)")
    samples: list[SampleSpec] = []
    seen: dict[str, str] = {}
    for p in paths:
        for s in read_spec_file(p, overrides):
            if s.name in seen:
                raise SpecError(f"{s.source}: name: {s.name!r} is not unique (also in {seen[s.name]})")
            seen[s.name] = s.source
            samples.append(s)
    return samples


def parse_override(field: str, text: str):
    """A command-line string -> the field's value (checked like the spec's); a prompt_path is made absolute
    against the working directory."""
    if field not in OVERRIDABLE:
        raise SpecError(f"--{field}: not a spec field that can be overridden ({', '.join(OVERRIDABLE)})")
    if field == "prompt_path":
        return os.path.abspath(os.path.expanduser(text))
    if field in ("prompt", "negative_prompt"):
        return text
    try:
        return _CHECKS[field](text)
    except _Bad as e:
        raise SpecError(f"--{field}={text}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Frames: what the sample's videos allow (reference cosmos_transfer2/multiview.py L166-238)


def ar_num_chunks(num_chunks: int, available: int, chunk_frames: int, overlap: int) -> int:
    """Chunks actually generated: the requested number, clamped to what `available` frames (per view, after the
    fps stride) allow: at most 1 + (available - chunk) // (chunk - overlap), at least 1."""
    max_chunks = max(1, 1 + (available - chunk_frames) // (chunk_frames - overlap))
    return min(num_chunks, max_chunks)


def frames_per_view(chunk_frames: int, overlap: int, num_chunks: int) -> int:
    """Pixel frames per view of `num_chunks` chunks that overlap by `overlap` frames: chunk + (chunk - o)(N - 1)."""
    return chunk_frames + (chunk_frames - overlap) * (num_chunks - 1)


def chunk_starts(chunk_frames: int, overlap: int, num_chunks: int) -> list[int]:
    """First pixel frame (per view) of each chunk: c * (chunk - overlap)."""
    return [c * (chunk_frames - overlap) for c in range(num_chunks)]


def latent_frames(pixel: int) -> int:
    """Latent frames of `pixel` conditioning frames (reference get_latent_num_frames): 1 + (n-1)//4, 0 -> 0."""
    return 0 if pixel <= 0 else 1 + (pixel - 1) // 4


@dataclasses.dataclass(frozen=True)
class FramePlan:
    """How a sample's videos are read and generated."""
    file_fps: float          # the fps F of every file
    stride: int              # F / spec fps: frames 0, stride, 2*stride, ...
    chunk_frames: int        # pixel frames per view of one generation (4 * (state_t - 1) + 1)
    num_chunks: int          # chunks generated (1 unless autoregressive; clamped to the control videos)
    frames: int              # pixel frames per view of the output
    input_frames: int        # pixel frames per view read from the input videos (the first chunk's conditioning)
    available: int           # control frames per view after the stride


def plan_frames(spec: SampleSpec, chunk_frames: int, probe: Callable | None = None) -> FramePlan:
    """Check the sample's videos against the spec and the model (fps, lengths) and plan the frames to read.
    `probe(path) -> VideoInfo` (default data.video.probe). SpecError naming the file, field and video on failure."""
    if probe is None:
        from cosmos_jax.data import video

        probe = video.probe
    from cosmos_jax.data.video import VideoError

    where = spec.source
    cond = spec.conditional_frames()
    uses_input = max(cond, default=0) > 0
    infos: dict[str, Any] = {}
    for key in spec.active_views:
        v = spec.views[key]
        for field in ("input_path", "control_path"):
            path = getattr(v, field)
            if path is None:
                continue
            try:
                infos[f"{key}.{field}"] = probe(path)
            except VideoError as e:
                raise SpecError(f"{where}: {key}.{field}: {e}") from None

    # one fps for every file, divisible by the spec's fps (reference: decord avg fps, `fps % desired_fps`)
    rates = sorted({round(info.fps, 6) for info in infos.values()})
    if len(rates) != 1:
        by_rate = {}
        for field, info in infos.items():
            by_rate.setdefault(round(info.fps, 6), field)
        listing = ", ".join(f"{f} {r:g} fps" for r, f in sorted(by_rate.items()))
        raise SpecError(f"{where}: fps: the videos' frame rates differ ({listing}); every input and control video "
                        "must have the same fps")
    file_fps = rates[0]
    ratio = file_fps / spec.fps
    stride = round(ratio)
    if stride < 1 or abs(ratio - stride) > 1e-6:
        raise SpecError(f"{where}: fps: {spec.fps} does not divide the videos' {file_fps:g} fps (frames are taken "
                        "every F/fps frames; choose an fps that divides it)")

    controls = {f: i for f, i in infos.items() if f.endswith(".control_path")}
    shortest = min(controls, key=lambda f: controls[f].num_frames)
    available = controls[shortest].num_frames // stride
    if available < chunk_frames:
        raise SpecError(f"{where}: {shortest}: {controls[shortest].path} has {controls[shortest].num_frames} frames "
                        f"= {available} at stride {stride} (fps {spec.fps}); the model needs {chunk_frames} per view")

    if spec.enable_autoregressive:
        if spec.chunk_overlap >= chunk_frames:
            raise SpecError(f"{where}: chunk_overlap: {spec.chunk_overlap} must be smaller than the "
                            f"{chunk_frames}-frame chunks")
        n_chunks = ar_num_chunks(spec.num_chunks, available, chunk_frames, spec.chunk_overlap)
        n_frames = frames_per_view(chunk_frames, spec.chunk_overlap, n_chunks)
    else:
        n_chunks, n_frames = 1, chunk_frames

    field = "num_conditional_frames"
    if spec.enable_autoregressive and any(spec.views[k].num_conditional_frames_per_view for k in spec.active_views):
        field = f"{spec.active_views[0]}.num_conditional_frames_per_view"
    if max(cond, default=0) > chunk_frames:
        raise SpecError(f"{where}: {field}: {max(cond)} is more than the {chunk_frames} frames of a chunk")
    input_frames = max(cond, default=0) if uses_input else 0
    for key in spec.active_views:
        info = infos.get(f"{key}.input_path")
        if input_frames and info is not None and (input_frames - 1) * stride >= info.num_frames:
            need = (input_frames - 1) * stride + 1
            raise SpecError(f"{where}: {key}.input_path: {info.path} has {info.num_frames} frames; "
                            f"{input_frames} conditioning frames at stride {stride} need {need}")
    return FramePlan(file_fps=file_fps, stride=stride, chunk_frames=chunk_frames, num_chunks=n_chunks,
                     frames=n_frames, input_frames=input_frames, available=available)
