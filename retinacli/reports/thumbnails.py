"""Thumbnails for the HTML reports: PNG data URIs of an item's pixels, or the one-line reason there are none.

An OCT volume gives its central B-scan and an en-face projection (the mean over depth, one row per
B-scan, stretched to the scan area's aspect); a fundus image gives itself, downscaled. Pixels are
contrast-stretched to 8 bits between the 1st and 99.5th percentiles. Files are found from a store row
(`root` id + path relative to the root's parent, absolute in stores of format 1-2) or given directly
(a query file), and read with :mod:`retinacli.readers`, so the per-item size budget (`--max-pixels`)
applies. A file that cannot be shown gets a :class:`Thumb` with a reason and no image; the reason never
holds the file's unredacted path.
"""

from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PNG_PREFIX = "data:image/png;base64,"
THUMB_MAX = 256  # longest side of a thumbnail, pixels
SMALL_MAX = 96  # the per-row thumbnail of a prediction report
LOW_PCT, HIGH_PCT = 1.0, 99.5
# What the path redaction writes in place of a component: a patient pseudonym (p + 12 hex) or, with
# --redact-paths, a component pseudonym (c + 10 hex); either keeps a short extension.
_PSEUDONYM = re.compile(r"^(p[0-9a-f]{12}|c[0-9a-f]{10})(\.[A-Za-z0-9]{1,5})?$")


@dataclass(frozen=True)
class Thumb:
    """One picture of an item: `kind` is bscan, enface or fundus; `uri` a PNG data URI, or None with a
    `reason` (what the report shows instead)."""

    kind: str
    uri: str | None = None
    reason: str | None = None


def placeholder(reason: str) -> list[Thumb]:
    return [Thumb("none", None, reason)]


def to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit copy of `array` stretched between its 1st and 99.5th percentiles (of the finite values);
    a flat image becomes mid-grey rather than noise."""
    data = np.asarray(array, dtype=np.float32)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.uint8)
    low, high = np.percentile(finite, [LOW_PCT, HIGH_PCT])
    if not high > low:
        return np.full(data.shape, 128, dtype=np.uint8)
    scaled = (np.nan_to_num(data, nan=low) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def png_uri(array: np.ndarray, max_side: int = THUMB_MAX, size: tuple[int, int] | None = None) -> str:
    """A PNG data URI of a 2-D (grey) or H x W x 3 (colour) array; `size` (width, height) resizes to
    exactly that, else the image is shrunk to fit `max_side` keeping its aspect."""
    from PIL import Image

    pixels = to_uint8(array)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if size is None:
        height, width = pixels.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return PNG_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def _enface_size(volume: np.ndarray, spacing: tuple[float, ...] | None, max_side: int) -> tuple[int, int]:
    """(width, height) of the en-face thumbnail: the scanned area's aspect when the pixel spacing is
    known (slices x slice spacing against width x column spacing), else square (most macular scans
    cover a square area); kept between 1:4 and 4:1."""
    n, _height, width = volume.shape
    aspect = 1.0
    if spacing is not None and len(spacing) == 3 and all(s and s > 0 for s in (spacing[0], spacing[2])):
        aspect = (n * spacing[0]) / (width * spacing[2])
    aspect = min(max(aspect, 0.25), 4.0)  # height / width
    out_w = min(width, max_side) if aspect <= 1 else max(1, round(min(width, max_side) / aspect))
    return max(1, out_w), max(1, round(out_w * aspect))


def oct_thumbs(volume: np.ndarray, spacing: tuple[float, ...] | None = None,
               max_side: int = THUMB_MAX, enface: bool = True) -> list[Thumb]:
    """The central B-scan and (with `enface`) the en-face projection of an (n, height, width) volume."""
    volume = np.asarray(volume)
    if volume.ndim == 4:  # a colour B-scan stack: its luminance
        volume = volume.mean(axis=3)
    if volume.ndim == 2:
        volume = volume[None]
    thumbs = [Thumb("bscan", png_uri(volume[volume.shape[0] // 2], max_side))]
    if enface:
        projection = volume.astype(np.float32).mean(axis=1)  # (slices, width)
        thumbs.append(Thumb("enface", png_uri(projection, size=_enface_size(volume, spacing, max_side))))
    return thumbs


def fundus_thumbs(image: np.ndarray, max_side: int = THUMB_MAX) -> list[Thumb]:
    return [Thumb("fundus", png_uri(np.asarray(image), max_side))]


def item_thumbs(item: Any, max_side: int = THUMB_MAX, enface: bool = True) -> list[Thumb]:
    """Thumbnails of a read item (an OctVolume or a FundusImage)."""
    if item.modality == "oct":
        return oct_thumbs(item.pixels, item.meta.pixel_spacing_mm, max_side, enface)
    return fundus_thumbs(item.pixels, max_side)


def missing_reason(where: Path) -> str:
    """Why a file is not at `where`: the first component that does not exist is a pseudonym the path
    redaction wrote (the stored path names no real folder), or the file was moved or deleted."""
    probe = Path(where.anchor)
    for part in where.parts[1:] if where.anchor else where.parts:
        probe = probe / part
        if not probe.exists():
            if _PSEUDONYM.match(part):
                return "path redacted: the source file cannot be located"
            break
    return "source file not found (moved or deleted)"


def _read(path: Path, modality: str | None) -> Any:
    from retinacli import readers
    from retinacli.readers.common import SERIES_PREFIX

    if not path.exists() and path.name.startswith(SERIES_PREFIX) and path.parent.is_dir():
        # one series of a folder holding several: the stored path names it virtually
        source = next((s for s in readers.scan([path.parent]).sources if s.path == path), None)
        if source is not None:
            items = readers.read_source(source, modality)
            if items:
                return items[0]
    if modality == "oct":
        return readers.read_oct(path)
    if modality == "fundus":
        return readers.read_fundus(path)
    return readers.read_item(path)


def _scrubbed(path: Path, reason: str) -> str:
    """A reader's reason without the file's own identifiers (a member file's name may hold them) and
    without its absolute path."""
    from retinacli.redaction import PathRedactor, file_identifiers

    shown = reason.replace(str(path), path.name)
    redactor = PathRedactor([], None)
    redactor.learn(values=file_identifiers(path))
    return redactor.scrub(shown)


def file_thumbs(path: Path, modality: str | None, max_side: int = THUMB_MAX, enface: bool = True
                ) -> list[Thumb]:
    """Thumbnails of the item of `modality` at `path`, or a placeholder saying why there are none."""
    from retinacli.errors import ReadError
    from retinacli.readers.common import SERIES_PREFIX

    if not path.exists() and not path.name.startswith(SERIES_PREFIX):
        return placeholder("source file not found (moved or deleted)")
    try:
        item = _read(path, modality)
    except ReadError as exc:
        return placeholder(_scrubbed(path, f"cannot be read: {exc.reason}"))
    except (OSError, ValueError, MemoryError) as exc:  # a reader's gap: still one line, the batch goes on
        return placeholder(_scrubbed(path, f"cannot be read: {type(exc).__name__}"))
    try:
        return item_thumbs(item, max_side, enface)
    except (ValueError, MemoryError) as exc:
        return placeholder(f"cannot be drawn: {type(exc).__name__}")


class Locator:
    """Finds the file behind an output record: by its store row (looked up by id, so a path printed
    with --redact-paths still resolves to the stored one) or by the record's own `root` and `path`."""

    def __init__(self, roots: dict[str, Any] | None = None, rows: dict[str, tuple[Any, Any]] | None = None):
        self.roots = roots or {}  # root id -> retinacli.redaction.Root
        self.rows = rows or {}  # item id -> (root id, stored path)
        self._cache: dict[tuple[str, str | None, int, bool], list[Thumb]] = {}

    @classmethod
    def for_store(cls, store_root: str | Path | None) -> Locator:
        """The roots and stored paths of the store at `store_root` (an empty locator when it cannot be
        opened: every tile then says why)."""
        if store_root is None:
            return cls()
        from retinacli.errors import RetinaError
        from retinacli.store import EmbeddingStore

        try:
            store = EmbeddingStore.open(Path(store_root))
            roots = {r.id: r for r in store.roots}
            rows = {r["id"]: (r.get("root"), r.get("path")) for r in store.metadata(["id", "root", "path"])}
        except (RetinaError, OSError):
            return cls()
        return cls(roots, rows)

    @classmethod
    def for_paths(cls, paths: list[Path] | list[str]) -> Locator:
        """Roots numbered as `retina predict PATH...` numbers them (r0 is the first PATH)."""
        from retinacli.redaction import roots_for

        return cls({r.id: r for r in roots_for(list(paths))[1]})

    def locate(self, record: dict[str, Any]) -> tuple[Path | None, str | None]:
        """(the file, None) or (None, why it cannot be located)."""
        from retinacli.readers.common import SERIES_PREFIX

        root_id, stored = self.rows.get(record.get("id") or "", (record.get("root"), record.get("path")))
        if not stored:
            return None, "no source path recorded"
        if root_id is None:
            if not os.path.isabs(str(stored)):  # a path shown relative to a query's own folder
                return None, "source not located (no root recorded)"
            where = Path(str(stored))
        else:
            root = self.roots.get(str(root_id))
            if root is None:
                return None, f"source not located (root {root_id} is not recorded)"
            where = Path(root.base) / str(stored)
        if not where.exists() and not where.name.startswith(SERIES_PREFIX):
            return None, missing_reason(where)
        return where, None

    def thumbs(self, record: dict[str, Any], path: Path | None = None, max_side: int = THUMB_MAX,
               enface: bool = True) -> list[Thumb]:
        """Thumbnails of a record's item (of `path` when given: a query file), else a placeholder."""
        if path is None:
            path, why = self.locate(record)
            if path is None:
                return placeholder(why or "source not located")
        key = (str(path), record.get("modality"), max_side, enface)
        if key not in self._cache:  # the same item may be a result of several queries
            self._cache[key] = file_thumbs(path, record.get("modality"), max_side, enface)
        return self._cache[key]
