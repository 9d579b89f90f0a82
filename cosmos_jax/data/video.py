"""Video files through PyAV: probe, decode chosen frames to uint8, encode H.264 MP4, resize as the reference does.

The reference dataloader decodes with decord and resizes every frame with
`torchvision.transforms.Resize((720, 1280), BILINEAR, antialias=True)` on uint8 tensors (reference_pipeline.md §1.6);
`resize` below reproduces that (PIL-style separable antialiased triangle filter, horizontal pass then vertical,
rounded to uint8 after each pass). PyAV is imported lazily so model code never needs it.
"""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction
from typing import Sequence

import numpy as np

from cosmos_jax import atomic

REFERENCE_SIZE = (720, 1280)  # (H, W) every training/inference frame is resized to


class VideoError(ValueError):
    """An unreadable, corrupt or unsuitable video file (the message starts with its path)."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: str
    fps: float
    num_frames: int
    height: int
    width: int


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("video I/O needs PyAV: pip install av") from e
    return av


def _open(path: str):
    av = _av()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such video file")
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise VideoError(f"{path}: cannot open as a video ({e})") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    return container


def probe(path: str | os.PathLike) -> VideoInfo:
    """fps, frame count, size. The count comes from the container, else from counting packets (no decoding)."""
    av = _av()
    path = os.fspath(path)
    container = _open(path)
    try:
        st = container.streams.video[0]
        rate = st.average_rate or st.guessed_rate
        if not rate:
            raise VideoError(f"{path}: the video stream has no frame rate")
        n = st.frames
        if not n:
            n = sum(1 for pkt in container.demux(st) if pkt.size)
        return VideoInfo(path, float(rate), int(n), st.codec_context.height, st.codec_context.width)
    except av.FFmpegError as e:
        raise VideoError(f"{path}: corrupt video ({e})") from e
    finally:
        container.close()


def read_frames(path: str | os.PathLike, indices: Sequence[int] | None = None, *, threads: int = 0) -> np.ndarray:
    """Decode the frames at `indices` (presentation order; all when None) -> uint8 (N, H, W, 3) RGB.

    Decoding is sequential from the start and stops after the last wanted frame (the reference only ever reads
    frames 0..28); `threads` > 0 sets the codec's thread count, 0 lets FFmpeg choose (frame + slice threading).
    """
    av = _av()
    path = os.fspath(path)
    wanted = None if indices is None else [int(i) for i in indices]
    if wanted is not None and any(i < 0 for i in wanted):
        raise VideoError(f"{path}: negative frame index in {wanted}")
    last = None if wanted is None else max(wanted, default=-1)
    keep = None if wanted is None else set(wanted)
    frames: dict[int, np.ndarray] = {}
    container = _open(path)
    decoded = 0
    try:
        st = container.streams.video[0]
        st.thread_type = "AUTO"
        if threads:
            st.codec_context.thread_count = threads
        if last is None or last >= 0:
            for frame in container.decode(st):
                if keep is None or decoded in keep:
                    # threads=1: swscale's default (a thread per host core, PyAV >= 17) fails with EAGAIN
                    # inside VMs and loader workers; one frame's colour conversion is cheap.
                    frames[decoded] = frame.to_ndarray(format="rgb24", threads=1)
                decoded += 1
                if last is not None and decoded > last:
                    break
    except av.FFmpegError as e:
        raise VideoError(f"{path}: corrupt video, decoding failed after {decoded} frames ({e})") from e
    finally:
        container.close()
    if wanted is None:
        if not frames:
            raise VideoError(f"{path}: no frames could be decoded")
        return np.stack([frames[i] for i in sorted(frames)])
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise VideoError(f"{path}: asked for frame {max(missing)} but the video has only {decoded} frames")
    if not wanted:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack([frames[i] for i in wanted])


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, *, crf: int = 18) -> None:
    """uint8 (N, H, W, 3) RGB -> H.264 (libx264, yuv420p) MP4, written atomically (temp file, then rename)."""
    av = _av()
    path = os.fspath(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise VideoError(f"{path}: expected uint8 frames (N>0, H, W, 3), got {frames.dtype} {frames.shape}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise VideoError(f"{path}: H.264 yuv420p needs even sizes, got {h}x{w}")
    with atomic.temporary_path(path, ".mp4") as tmp:
        with av.open(tmp, mode="w", format="mp4") as container:
            st = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(10000))
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            st.options = {"crf": str(crf)}
            for arr in frames:
                for packet in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                    container.mux(packet)
            for packet in st.encode():
                container.mux(packet)


# ----------------------------------------------------------------------------------------------------------------
# Resize (torchvision Resize(BILINEAR, antialias=True) on uint8)


def _aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(index, weight) arrays (out_size, K) of the antialiased bilinear (triangle) filter, PIL/ATen convention."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    k = int((hi - lo).max())
    idx = lo[:, None] + np.arange(k)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs((idx - centers[:, None] + 0.5) * inv))
    w = np.where(idx < hi[:, None], w, 0.0)
    w /= w.sum(axis=1, keepdims=True)
    return np.minimum(idx, in_size - 1), w


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    idx, w = _aa_taps(x.shape[axis], out_size)
    acc = None
    for j in range(idx.shape[1]):
        shape = [1] * x.ndim
        shape[axis] = out_size
        term = np.take(x, idx[:, j], axis=axis).astype(np.float32) * w[:, j].astype(np.float32).reshape(shape)
        acc = term if acc is None else acc + term
    return np.clip(np.floor(acc + 0.5), 0, 255).astype(np.uint8)


def resize(frames: np.ndarray, size: tuple[int, int] = REFERENCE_SIZE) -> np.ndarray:
    """uint8 (..., H, W, 3) -> (..., size[0], size[1], 3): antialiased bilinear, as the reference's Resize.

    Matches torch's uint8 antialiased bilinear kernel to within 1 grey level (its weights are fixed-point).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"resize expects uint8 (..., H, W, 3) frames, got {frames.dtype} {frames.shape}")
    out = frames
    if out.shape[-2] != size[1]:
        out = _resize_axis(out, size[1], axis=out.ndim - 2)
    if out.shape[-3] != size[0]:
        out = _resize_axis(out, size[0], axis=out.ndim - 3)
    return out
