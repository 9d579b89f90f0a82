"""Atomic file writes: the data goes to a temporary file beside the target, which is then renamed onto it
(`os.replace`), so an interrupted or failed write never leaves a truncated file or damages an existing one."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def temporary_path(path: str | os.PathLike, suffix: str = ""):
    """Yields a temporary path beside `path` to write to; on success it replaces `path`, on failure it is removed."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with temporary_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with temporary_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_npy(path: str | os.PathLike, array) -> None:
    """`np.save` of one array to `path` (no `.npy` appended), atomically."""
    import numpy as np

    with temporary_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
