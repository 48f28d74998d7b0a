"""On-disk cache for prepared data (decoded patches, built cohorts).

Preparation runs once per data version (nanoGPT's ``prepare.py`` idea): the
key hashes the settings and each input file's name, size and modification
time, so editing or replacing a file invalidates the entry without reading
gigabytes to hash them. Entries are written to a temporary file and renamed,
so a crash never leaves a half-written cache that a later round would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.errors import DataFormatError


def fingerprint(*parts: object) -> str:
    """Short hash of settings and files (a ``Path`` contributes its name, size and mtime).

    Raises
    ------
    DataFormatError
        A file that cannot be looked at (a dangling link, a symlink loop), naming it.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            try:
                st = part.stat()
            except OSError as err:  # a dangling link, a symlink loop, no permission
                raise DataFormatError(f"{part}: cannot read the file: {err.strerror}") from None
            h.update(f"{part.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_arrays(
    cache_dir: Path | None, name: str, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Load ``name`` from ``cache_dir`` or build, save atomically and return it. ``None``: no cache."""
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / f"{name}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    arrays = build()
    write_atomic(path, "wb", lambda f: np.savez(f, **arrays))
    return arrays


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically: a crash never leaves half a file."""
    write_atomic(Path(path), "w", lambda f: json.dump(obj, f, indent=1, allow_nan=True))


def write_atomic(path: Path, mode: str, write: Callable, durable: bool = False) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it onto ``path``: no reader sees half a
    file, and a symbolic link planted at ``path`` is replaced, never written through. ``durable``: the file is
    fsynced before the rename and the folder after it, so the file and its rename survive a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
