"""`retina models install URL`: a package published as a ``.tar.gz`` or ``.zip`` archive.

The descriptor travels inside the archive, so its hashes only prove the files match each other: a
swapped archive carries its own matching descriptor. ``--sha256`` (of the archive) and ``--model-id``
(of the package) are the pins that tie it to what its publisher announced.

Nothing is trusted before it is checked: the download is capped (Content-Length first, then while
streaming), archive entries are checked from their headers (no absolute paths, ``..``, links,
devices, duplicates; capped count and sizes) and again while written (a zip bomb is stopped), and the
extracted package goes through the same verification and copy as a local folder
(:func:`retinacli.package.install_package`). Downloads and extraction happen in temp entries of
``$RETINA_HOME`` (the models folder's parent), removed whatever happens.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

from retinacli.errors import ModelPackageError, UsageError
from retinacli.package import (
    DESCRIPTOR_FILE,
    install_package,
    model_id_for,
    model_ids_for,
    models_dir,
    verify_package,
)

# Caps (bytes/entries); the environment variables lower or raise them (tests use small ones).
MAX_DOWNLOAD_BYTES = 2 << 30
MAX_EXTRACT_BYTES = 4 << 30
MAX_ENTRIES = 1000
TIMEOUT_S = 60.0
ENV_MAX_DOWNLOAD = "RETINA_INSTALL_MAX_DOWNLOAD_BYTES"
ENV_MAX_EXTRACT = "RETINA_INSTALL_MAX_EXTRACT_BYTES"
ENV_MAX_ENTRIES = "RETINA_INSTALL_MAX_ENTRIES"
_CHUNK = 1 << 20

NO_PIN_WARNING = (
    "warning: no --sha256 or --model-id pin: the archive's own hashes prove nothing against a swapped "
    "archive; pin the sha256 or model id its publisher gives"
)


def _line(exc: object) -> str:
    return " ".join(str(exc).split())


def is_url(source: str) -> bool:
    return bool(re.match(r"(?i)https?://", source))


def _cap(env: str, default: int) -> int:
    raw = os.environ.get(env)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"${env}: '{raw}' is not a whole number of bytes") from None
    if value <= 0:
        raise UsageError(f"${env}: must be positive, got {value}")
    return value


def check_sha256_pin(value: str | None) -> str | None:
    """The --sha256 pin in lower case; exit 2 when it is not 64 hex digits."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value.strip()):
        raise UsageError(f"--sha256: '{value}' is not a sha256 (64 hex digits)")
    return value.strip().lower()


def download(url: str, dest: Path, on_progress: Callable[[int, int | None], None] | None = None) -> str:
    """Stream `url` into `dest` (capped, with a timeout) and return the sha256 of what was written."""
    cap = _cap(ENV_MAX_DOWNLOAD, MAX_DOWNLOAD_BYTES)
    request = urllib.request.Request(url, headers={"User-Agent": "retina-models-install"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise UsageError(f"{url}: download failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"{url}: download failed: {_line(reason)}") from None
    digest = hashlib.sha256()
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total > cap:
            raise ModelPackageError(f"{url}: archive is {total} bytes, over the {cap}-byte download cap")
        done = 0
        with open(dest, "wb") as fh:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except OSError as exc:  # timeouts and resets mid-stream
                    raise UsageError(f"{url}: download failed: {_line(exc)}") from None
                if not chunk:
                    break
                done += len(chunk)
                if done > cap:
                    raise ModelPackageError(f"{url}: archive exceeds the {cap}-byte download cap")
                digest.update(chunk)
                fh.write(chunk)
                if on_progress is not None:
                    on_progress(done, total)
        if total is not None and done != total:
            raise UsageError(f"{url}: download incomplete ({done} of {total} bytes)")
    return digest.hexdigest()


def _safe_name(name: str, where: str, seen: set[str]) -> PurePosixPath | None:
    """The entry's relative path, or raise when it could land outside the staging folder."""
    if "\\" in name or "\x00" in name:
        raise ModelPackageError(f"{where}: entry '{name}' has a backslash or NUL in its name")
    path = PurePosixPath(name)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise ModelPackageError(f"{where}: entry '{name}' has an absolute path")
    if ".." in path.parts:
        raise ModelPackageError(f"{where}: entry '{name}' has '..' in its path")
    parts = [p for p in path.parts if p != "."]
    if not parts:
        return None  # "./" itself
    key = "/".join(parts)
    if key in seen:
        raise ModelPackageError(f"{where}: entry '{name}' appears twice")
    seen.add(key)
    return PurePosixPath(*parts)


class _Budget:
    """Entry count, per-entry and total extracted bytes, checked from headers and while writing."""

    def __init__(self, where: str):
        self.where = where
        self.max_bytes = _cap(ENV_MAX_EXTRACT, MAX_EXTRACT_BYTES)
        self.max_entries = _cap(ENV_MAX_ENTRIES, MAX_ENTRIES)
        self.entries = 0
        self.total = 0

    def entry(self, name: str, declared: int) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise ModelPackageError(f"{self.where}: more than {self.max_entries} entries")
        if declared > self.max_bytes or self.total + declared > self.max_bytes:
            raise ModelPackageError(
                f"{self.where}: entry '{name}' ({declared} bytes) exceeds the {self.max_bytes}-byte "
                "extraction cap"
            )

    def copy(self, name: str, src: IO[bytes], dest: Path, declared: int) -> None:
        written = 0
        with open(dest, "xb") as fh:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                self.total += len(chunk)
                if written > declared or self.total > self.max_bytes:
                    raise ModelPackageError(
                        f"{self.where}: entry '{name}' expands beyond its declared {declared} bytes "
                        f"or the {self.max_bytes}-byte extraction cap"
                    )
                fh.write(chunk)
        if written != declared:
            raise ModelPackageError(
                f"{self.where}: entry '{name}' is truncated ({written} of {declared} bytes)")


# What an archive entry is, the same for both formats: only files and folders are ever written.
_FILE, _DIR, _LINK, _SPECIAL = "file", "folder", "link", "special"


def _tar_entries(tar: tarfile.TarFile):
    """(name, kind, declared size, opener) per member; headers are read one by one, so a huge entry
    list stops at the entry cap."""
    for member in tar:
        if member.issym() or member.islnk():
            kind = _LINK
        else:
            kind = _FILE if member.isfile() else _DIR if member.isdir() else _SPECIAL
        size = member.size if member.isfile() else 0
        yield member.name, kind, size, lambda member=member: tar.extractfile(member)


def _zip_entries(zf: zipfile.ZipFile, budget: _Budget, where: str):
    """(name, kind, declared size, opener) per entry; the central directory gives the count up front."""
    infos = zf.infolist()
    if len(infos) > budget.max_entries:
        raise ModelPackageError(f"{where}: {len(infos)} entries, over the {budget.max_entries} cap")
    for info in infos:
        mode = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix mode recorded
        if mode == stat.S_IFLNK:
            kind = _LINK
        elif mode not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = _SPECIAL
        else:
            kind = _DIR if info.is_dir() else _FILE
        yield info.filename, kind, info.file_size, lambda info=info: zf.open(info)


def _extract_entries(entries, out: Path, where: str, budget: _Budget) -> None:
    """Check each entry (name, kind, size cap) before writing it under `out`; the copy is capped too."""
    seen: set = set()
    for name, kind, size, open_source in entries:
        rel = _safe_name(name, where, seen)
        if kind == _LINK:
            raise ModelPackageError(f"{where}: entry '{name}' is a link (not allowed)")
        if kind == _SPECIAL:
            raise ModelPackageError(f"{where}: entry '{name}' is a device, FIFO or special file")
        budget.entry(name, size)
        if rel is None:
            continue
        target = out.joinpath(*rel.parts)
        if kind == _DIR:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = open_source()
        if src is None:
            raise ModelPackageError(f"{where}: entry '{name}' cannot be read")
        with src:
            budget.copy(name, src, target, size)


def _extract_tar(archive: Path, out: Path, where: str) -> None:
    budget = _Budget(where)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            _extract_entries(_tar_entries(tar), out, where, budget)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ModelPackageError(f"{where}: not a readable .tar.gz archive ({_line(exc)})") from None


def _extract_zip(archive: Path, out: Path, where: str) -> None:
    budget = _Budget(where)
    try:
        with zipfile.ZipFile(archive) as zf:
            _extract_entries(_zip_entries(zf, budget, where), out, where, budget)
    except ModelPackageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError,
            zlib.error) as exc:
        raise ModelPackageError(f"{where}: not a readable .zip archive ({_line(exc)})") from None


def extract_archive(archive: Path, out: Path, where: str) -> Path:
    """Extract a .tar.gz or .zip (told apart by their first bytes) into `out`; return the package folder
    (`out` itself, or its one top-level folder)."""
    with open(archive, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        _extract_tar(archive, out, where)
    elif magic == b"PK\x03\x04":
        _extract_zip(archive, out, where)
    else:
        raise ModelPackageError(f"{where}: not a .tar.gz or .zip archive")
    if (out / DESCRIPTOR_FILE).is_file():
        return out
    # macOS's Finder adds a __MACOSX folder of resource forks beside the package: not part of it
    children = [c for c in out.iterdir() if c.name != "__MACOSX"]
    if len(children) == 1 and children[0].is_dir() and (children[0] / DESCRIPTOR_FILE).is_file():
        return children[0]
    raise ModelPackageError(f"{where}: no {DESCRIPTOR_FILE} at the archive's top or in one top-level folder")


def check_model_id(package_dir: Path, expected: str, where: str) -> dict[str, Any]:
    """Verify the package's files (as install does) and that its model id is the pinned one."""
    descriptor, _ = verify_package(package_dir, read=False)
    if expected not in model_ids_for(descriptor):
        raise ModelPackageError(
            f"{where}: model id {model_id_for(descriptor)} differs from the pinned --model-id {expected}"
        )
    return descriptor


def install_from_url(url: str, *, sha256: str | None = None, model_id: str | None = None,
                     force: bool = False,
                     on_progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download, check and install the package archive at `url`; return the installed folder.

    Raises UsageError (exit 2) for a URL that cannot be fetched and ModelPackageError (exit 3) for an
    archive or package that fails a check; either way nothing is added to the models folder.
    """
    home = models_dir().parent
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=home)
    os.close(fd)
    archive = Path(tmp_name)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=home))
    try:
        digest = download(url, archive, on_progress)
        if sha256 is not None and digest != sha256:
            raise ModelPackageError(
                f"{url}: archive sha256 {digest} differs from the pinned --sha256 {sha256}")
        package = extract_archive(archive, staging, url)
        try:
            if model_id is not None:
                check_model_id(package, model_id, str(package / DESCRIPTOR_FILE))
            return install_package(package, force=force)
        except ModelPackageError as exc:  # name the URL: the staging path means nothing to the user
            raise ModelPackageError(f"{url}: {str(exc).replace(str(package) + os.sep, '')}") from None
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
