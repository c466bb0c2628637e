"""Crash-safe file and folder replacement: the one place that writes a file or a folder atomically.

A reader never sees a half-written file: data goes to a temp file beside the target, is fsynced,
renamed over the target, and the folder is fsynced so the rename itself survives a power cut.
Folders (model packages, synthetic cohorts) are built in a staging folder beside the target and
swapped in by :func:`replace_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where folders cannot be opened: Windows)."""
    if sys.platform.startswith("win"):
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed over `path`.

    For writers that want a file name (``torch.save``, ``np.save``, ``pq.write_table``). On an
    exception the temp file is removed and `path` is untouched. The temp name holds the process id,
    so two processes writing the same file (two searches building one ANN index) never share it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    """Pretty-printed UTF-8 JSON with a trailing newline, written atomically; NaN/Infinity become null."""
    from retinacli.jsonutil import dumps

    atomic_write_text(path, dumps(payload, indent=2, ensure_ascii=False) + "\n")


def staging_dir(target: str | Path) -> Path:
    """A fresh empty folder beside `target` (same file system, so :func:`replace_dir` is a rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def replace_dir(staging: str | Path, target: str | Path) -> Path:
    """Swap a fully written `staging` folder in as `target` (an existing `target` is replaced).

    The old folder is first renamed aside, so at every moment `target` is either the old or the new
    complete folder, except for the instant between two renames.
    """
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def building_dir(target: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `target`, on an exception it is removed."""
    staging = staging_dir(target)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, target)


def folder_entries(folder: str | Path) -> set[Path]:
    """What `folder` holds now (empty when it does not exist): the "before" of :func:`remove_new_entries`."""
    folder = Path(folder)
    return set(folder.iterdir()) if folder.is_dir() else set()


def remove_new_entries(folder: str | Path, before: set[Path], remove_folder: bool) -> None:
    """Undo what a failed command added to `folder`: every entry not in `before` is removed (the
    user's own files stay), and `folder` itself when `remove_folder` (the command made it) and it is
    then empty. A retry then finds the folder as it was."""
    folder = Path(folder)
    for path in folder_entries(folder) - before:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if remove_folder:
        with contextlib.suppress(OSError):
            folder.rmdir()

