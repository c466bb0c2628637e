"""Folder discovery: which files and folders are OCT volumes, which are fundus images, which are broken.

Headers only (DICOM `stop_before_pixels`, Pillow's lazy open, the .npy / .vol headers), so scanning a
big export is cheap; pixels are decoded later, one source at a time. `scan_iter` passes each source,
error and ignored file on as soon as it is known (so `retina embed` starts before the walk ends);
`scan` collects them. Rules (docs/data-layout.md):

- hidden files/folders and symlink loops are skipped; the project's own outputs (embedding stores,
  model packages, training runs: a folder holding `store.json`, `retina.json`, `preprocess.json` or a
  `checkpoints` folder) are not walked and are listed under `ignored` with the reason; `DICOMDIR` and
  non-image files are ignored (listed too);
- each multi-frame DICOM, TIFF, .npy, .vol and single image is one source;
- single-frame OCT DICOM files are grouped per folder by SeriesInstanceUID into one volume;
- a folder with a HEYEX XML export (an `.xml` whose root is HEDX) gives one OCT + localizer source per
  OCT series of the XML; its XML and image files are not listed again;
- numbered grayscale images of one size in one folder without subfolders (bscan_0.png, bscan_1.png,
  ...) are one volume;
- an image-like file that cannot be read (zero bytes, wrong content, truncated header) is an error.
"""

from __future__ import annotations

import errno
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from retinacli.errors import ReadError
from retinacli.readers import dicom as dicom_reader
from retinacli.readers.common import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NPY_SUFFIXES,
    SERIES_PREFIX,
    TIFF_SUFFIXES,
    VOL_SUFFIXES,
    Source,
    natural_key,
    numbered_pattern,
    open_failure,
    short,
)
from retinacli.readers.images import ImageHeader, image_header

# Folders the project writes: never read back as data.
OUTPUT_DIR_NAMES = {".retina", "__pycache__", "checkpoints"}


class Ignored(NamedTuple):
    """A file or folder discovery did not read, and why (not an error)."""

    path: Path
    why: str


@dataclass
class Discovery:
    sources: list[Source] = field(default_factory=list)
    errors: list[ReadError] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (path, why), not errors


# Why a folder is one of retina's own outputs, listed under `ignored` (never skipped without a word).
OUTPUT_REASONS = {
    "store.json": "an embedding store (has store.json)",
    "retina.json": "a model package (has retina.json)",
    "preprocess.json": "a training run (has preprocess.json)",
}
OUTPUT_FOLDER_NOTE = "; retina does not read its own outputs as data"


def output_dir_reason(path: Path) -> str | None:
    """Why `path` is one of retina's outputs (store, package, training run, checkpoints), or None."""
    if path.name in OUTPUT_DIR_NAMES:
        what = "training checkpoints" if path.name == "checkpoints" else f"a {path.name} folder"
        return what + OUTPUT_FOLDER_NOTE
    for marker, reason in OUTPUT_REASONS.items():
        if (path / marker).is_file():
            return reason + OUTPUT_FOLDER_NOTE
    if (path / "checkpoints").is_dir():
        return "a training run (has a checkpoints folder)" + OUTPUT_FOLDER_NOTE
    return None


def _is_output_dir(path: Path) -> bool:
    return output_dir_reason(path) is not None


def _inside_output(path: Path) -> bool:
    """An explicitly named folder that is (or sits directly in) one of retina's own outputs."""
    resolved = path.resolve()
    if ".retina" in resolved.parts:
        return True
    return _is_output_dir(resolved) or (resolved.parent != resolved and _is_output_dir(resolved.parent))


_PLAIN_IMAGE_SUFFIXES = frozenset(IMAGE_SUFFIXES | TIFF_SUFFIXES)
_IMAGE_LIKE_SUFFIXES = frozenset(_PLAIN_IMAGE_SUFFIXES | DICOM_SUFFIXES | NPY_SUFFIXES | VOL_SUFFIXES)


def _plain_image(name: str) -> bool:
    return Path(name).suffix.lower() in _PLAIN_IMAGE_SUFFIXES


def _image_like(path: Path) -> bool:
    return path.suffix.lower() in _IMAGE_LIKE_SUFFIXES


class _Scanner:
    def __init__(self, metas: bool = True) -> None:
        self.metas = metas  # False: DICOM metadata is read on first use (HeaderMetas), not here
        self.result = Discovery()
        self._seen_dirs: set[tuple[int, int]] = set()
        self._seen_sources: set[str] = set()

    # -- one file ---------------------------------------------------------------------------------
    def classify_file(self, path: Path):
        """-> ("dicom", ds, (modality, description, single B-scan?)) | ("image", ImageHeader) | Source |
        None (ignored, already recorded)."""
        suffix = path.suffix.lower()
        if path.name.upper() == "DICOMDIR":
            self.result.ignored.append((path, "DICOMDIR index"))
            return None
        try:
            if suffix not in DICOM_SUFFIXES:  # a DICOM file is opened once, by read_header (same reasons)
                _check_openable(path)
            if suffix in VOL_SUFFIXES:
                from retinacli.readers.heidelberg import read_vol_header, vol_metas

                header = read_vol_header(path)
                metas = vol_metas(header)
                return Source(path, "vol", ("oct", "fundus"), metas=metas, format="heidelberg-vol")
            if suffix in NPY_SUFFIXES:
                from retinacli.readers.volumes import npy_header, npy_modality

                shape, _ = npy_header(path)
                return Source(path, "npy", (npy_modality(path, shape),), format="npy")
            if suffix in TIFF_SUFFIXES:
                header = image_header(path)
                if header.pages > 1:
                    return Source(path, "tiff", ("oct",), format="tiff")
                return ("image", header)
            if suffix in IMAGE_SUFFIXES:
                return ("image", image_header(path))
            if suffix in DICOM_SUFFIXES or dicom_reader.has_dicom_magic(path):
                ds = dicom_reader.read_header(path, check=self.metas)
                return ("dicom", ds, dicom_reader.classify_header(path, ds))
            from retinacli.readers.common import vendor_format_reason

            vendor = vendor_format_reason(path)  # .e2e / .fda / .fds / Cirrus .img: named, not ignored
            if vendor:
                raise ReadError(path, vendor)
        except ReadError as exc:
            self.result.errors.append(exc)
            return None
        except OSError as exc:
            self.result.errors.append(ReadError(path, f"cannot open ({short(exc)})"))
            return None
        why = f"not an image ({suffix} file)" if suffix else "not an image or DICOM file"
        self.result.ignored.append((path, why))
        return None

    def add(self, source: Source) -> None:
        key = str(source.path)
        if key not in self._seen_sources:
            self._seen_sources.add(key)
            self.result.sources.append(source)

    def dicom_source(self, path: Path, ds, classified: tuple) -> Source | None:
        modality, description, _ = classified
        if modality is None:
            self.result.ignored.append((path, description))
            return None
        # the reader decodes from this dataset (pixel data deferred): the file is parsed once
        if not self.metas:  # read on first use (the reader's, which checks the size first), whole dataset
            metas = dicom_reader.HeaderMetas(path, modality, ds)
            return Source(path, "dicom", (modality,), metas=metas, format="dicom", header=ds)
        try:
            dicom_reader.check_size(path, ds)
        except ReadError as exc:
            self.result.errors.append(exc)
            return None
        metas = {modality: dicom_reader.header_meta(ds)}
        dicom_reader.keep_for_decoding(ds)
        return Source(path, "dicom", (modality,), metas=metas, format="dicom", header=ds)

    # -- explicit paths -----------------------------------------------------------------------------
    def scan_path(self, path: Path) -> Iterator[None]:
        """Discover one path named by the user (a generator: a folder is walked as it is iterated)."""
        if not path.exists() and not path.is_symlink():
            # A virtual source path discovery made up: "<folder>/series=<uid>" or "<folder>/bscan_#.png".
            if path.parent.is_dir() and (path.name.startswith(SERIES_PREFIX) or "*" in path.name):
                errors_before = len(self.result.errors)
                sources, _ = self.scan_dir(path.parent)
                del self.result.errors[errors_before:]  # other files' problems are not this path's
                matches = [source for source in sources if source.path == path]
                if matches:
                    self.add(matches[0])
                    return
            self.result.errors.append(ReadError(path, "no such file or directory"))
            return
        if path.is_symlink() and not path.exists():
            self.result.errors.append(ReadError(path, _dangling_link_reason(path)))
            return
        if path.is_dir():
            if _inside_output(path):
                resolved = path.resolve()
                why = output_dir_reason(resolved) or output_dir_reason(resolved.parent)
                self.result.ignored.append((path, why or "inside a .retina folder" + OUTPUT_FOLDER_NOTE))
                return
            yield from self.walk(path)
            return
        if not path.is_file():  # a FIFO, socket or device: opening it could block forever
            self.result.errors.append(ReadError(path, "not a regular file (FIFO, socket or device)"))
            return
        if path.suffix.lower() == ".xml":
            from retinacli.readers.heyex_xml import is_heyex_xml

            if is_heyex_xml(path):  # a HEYEX export named by its XML: the export's sources
                errors_before = len(self.result.errors)
                sources, _ = self.scan_dir(path.parent)
                mine = [source for source in sources if source.members[:1] == (path,)]
                # other files' problems are not this path's
                self.result.errors[errors_before:] = [
                    exc for exc in self.result.errors[errors_before:] if exc.path == str(path)
                ]
                for source in mine:
                    self.add(source)
                return
        found = self.classify_file(path)
        if isinstance(found, Source):
            self.add(found)
        elif isinstance(found, tuple) and found[0] == "dicom":
            source = self.dicom_source(path, found[1], found[2])
            if source is not None:
                self.add(source)
        elif isinstance(found, tuple) and found[0] == "image":
            self.add(Source(path, "image", ("fundus",), format=found[1].format))

    def walk(self, root: Path) -> Iterator[None]:
        """Walk a folder tree; yields after each file so the caller can pass on what was found."""
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                key = (directory.stat().st_dev, directory.stat().st_ino)
            except OSError as exc:
                self.result.errors.append(ReadError(directory, f"cannot open folder ({short(exc)})"))
                continue
            if key in self._seen_dirs:  # symlink loop or the same folder twice
                continue
            self._seen_dirs.add(key)
            subdirs: list[Path] = []
            for source in self.folder(directory, subdirs):
                if source is not None:
                    self.add(source)
                yield
            stack.extend(reversed(subdirs))

    def drain(self) -> Iterator[Source | ReadError | Ignored]:
        """What was found since the last drain, forgotten once passed on (memory stays bounded)."""
        found = self.result
        if found.sources or found.errors or found.ignored:
            yield from found.sources
            yield from found.errors
            yield from (Ignored(path, why) for path, why in found.ignored)
            self.result = Discovery()

    # -- one folder -----------------------------------------------------------------------------------
    def scan_dir(self, directory: Path) -> tuple[list[Source], list[Path]]:
        """Classify the files of one folder: (its sources, its subfolders to walk)."""
        subdirs: list[Path] = []
        return [source for source in self.folder(directory, subdirs) if source is not None], subdirs

    def folder(self, directory: Path, subdirs: list[Path]) -> Iterator[Source | None]:
        """The sources of one folder, in order, each as soon as it is known (None after each other file);
        its subfolders are appended to `subdirs`. Single files come first as they are classified; what
        needs the whole folder (B-scan image stacks, single-frame DICOM series) comes at its end."""
        try:
            entries = sorted(os.scandir(directory), key=lambda e: natural_key(e.name))
        except OSError as exc:
            self.result.errors.append(ReadError(directory, f"cannot list folder ({short(exc)})"))
            return
        subdirs_before = len(subdirs)
        series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
        images: list[tuple[Path, ImageHeader]] = []
        exports, consumed = self.heyex_exports(directory, entries)
        yield from exports
        for entry in entries:
            if entry.name.startswith("."):
                continue
            yield None  # a pause point: the caller passes on errors and ignored files found so far
            path = Path(entry.path)
            if consumed and path in consumed:  # a HEYEX export's XML and image files: read through the export
                continue
            try:
                if entry.is_dir():  # follows symlinks; loops are caught by the (dev, inode) set
                    why = output_dir_reason(path)
                    if why is None:
                        subdirs.append(path)
                    elif path.name != "__pycache__":  # listed, so a skipped folder is never silent
                        self.result.ignored.append((path, why))
                    continue
                if not entry.is_file():  # FIFOs, sockets, devices are never opened
                    if entry.is_symlink():
                        self.result.errors.append(ReadError(path, _dangling_link_reason(path)))
                    continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    self.result.errors.append(ReadError(path, "symbolic link loop"))
                else:
                    self.result.errors.append(ReadError(path, f"cannot open ({short(exc)})"))
                continue
            if not _image_like(path) and entry.stat().st_size == 0:  # (an image-like file's reader says so)
                self.result.ignored.append((path, "empty file"))
                continue
            found = self.classify_file(path)
            if isinstance(found, Source):
                yield found
            elif isinstance(found, tuple) and found[0] == "image":
                images.append((path, found[1]))
            elif isinstance(found, tuple) and found[0] == "dicom":
                ds, classified = found[1], found[2]
                if classified[2]:  # one single-frame B-scan: grouped by series
                    series[str(ds.get("SeriesInstanceUID", "") or "unknown")].append((path, ds))
                else:
                    source = self.dicom_source(path, ds, classified)
                    if source is not None:
                        yield source
        # a folder's own subfolders are known now: an image stack only forms in a leaf folder
        leaf = len(subdirs) == subdirs_before
        yield from _image_sources(directory, images, leaf=leaf)
        for number, (uid, members) in enumerate(series.items(), 1):
            label = _series_label(uid, number)
            path = directory if len(series) == 1 else directory / f"{SERIES_PREFIX}{label}"
            yield _series_source(path, members)

    def heyex_exports(self, directory: Path, entries: list) -> tuple[list[Source], set[Path]]:
        """The HEYEX XML export(s) in `directory`: one source per OCT series, and the files they consume
        (the XML and its images; all the folder's images when the XML is broken, whose error is listed)."""
        from retinacli.readers import heyex_xml

        xmls = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.lower().endswith(".xml"):
                continue
            try:
                if entry.is_file() and heyex_xml.is_heyex_xml(Path(entry.path)):
                    xmls.append(Path(entry.path))
            except OSError:
                continue
        if not xmls:
            return [], set()
        consumed: set[Path] = set(xmls)
        found: list[tuple[Path, list]] = []
        for xml_path in xmls:
            try:
                found.append((xml_path, heyex_xml.parse_export(xml_path)))
            except ReadError as exc:
                self.result.errors.append(exc)
                # the export's images are not read as anonymous images: they would lose eye and date
                consumed.update(Path(e.path) for e in entries if _plain_image(e.name))
        if len(xmls) > 1:
            why = f"folder holds {len(xmls)} HEYEX XML exports; give each its own folder"
            self.result.errors.extend(ReadError(xml_path, why) for xml_path in xmls)
            consumed.update(Path(e.path) for e in entries if _plain_image(e.name))
            return [], consumed
        sources: list[Source] = []
        for xml_path, all_series in found:
            for one in all_series:
                consumed.update(heyex_xml.referenced_files([one]))
                single = len(all_series) == 1
                path = directory if single else directory / f"{SERIES_PREFIX}{HEYEX_LABEL}{one.number}"
                modalities = ("oct", "fundus") if one.localizer is not None else ("oct",)
                sources.append(
                    Source(path, "heyex-xml", modalities, members=(xml_path,), metas=one.metas,
                           format=heyex_xml.FORMAT)
                )
        return sources, consumed


# A HEYEX export with several OCT series names each "<folder>/series=heyex-<n>" (n: its order in the XML).
HEYEX_LABEL = "heyex-"


def _series_label(uid: str, number: int) -> str:
    """The series' name in its virtual path: its UID when it is one (digits and dots), else a number in
    folder order (a SeriesInstanceUID holding other text could be anything, a patient's name included)."""
    if uid == "unknown" or dicom_reader.is_uid(uid):  # "unknown": the files have no SeriesInstanceUID
        return uid
    return f"invalid-{number}"


def _check_openable(path: Path) -> None:
    """Open (non-blocking) and close: a file retina may not read is reported as such, not as a
    broken image. (Root reads anything; the test suite simulates EACCES, see tests/bad_inputs.py.)"""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise open_failure(path, exc) from None
    os.close(fd)


def _dangling_link_reason(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
    return "broken symbolic link"


def _series_source(path: Path, members: list[tuple[Path, object]]) -> Source:
    ordered = dicom_reader.series_order(members)
    first = next(ds for p, ds in members if p == ordered[0])
    meta = dicom_reader.header_meta(first)
    for _, ds in members:  # the localizer may be referenced by any B-scan
        for uid in dicom_reader.referenced_uids(ds):
            if uid not in meta.referenced_sop_uids:
                meta.referenced_sop_uids = (*meta.referenced_sop_uids, uid)
    meta.sop_instance_uid = None
    headers = {str(p): ds for p, ds in members}  # the reader decodes from these: one parse a file
    return Source(
        path, "dicom-series", ("oct",), members=tuple(ordered), metas={"oct": meta}, format="dicom-series",
        header=tuple(headers[str(p)] for p in ordered),
    )


def _image_sources(directory: Path, images: list[tuple[Path, ImageHeader]], leaf: bool) -> list[Source]:
    """In a folder without subfolders, numbered grayscale images of one size form a B-scan volume;
    every other image is a fundus image. (A patient folder with visit subfolders next to its numbered
    NIR images, e.g. OD_v00_fundus.png, OD_v01_fundus.png, is not a B-scan folder.)"""
    groups: dict[tuple, list[Path]] = defaultdict(list)
    for path, header in images:
        if header.grayscale:
            groups[(numbered_pattern(path.name), header.width, header.height)].append(path)
    stacks = [
        (pattern, paths) for (pattern, _, _), paths in groups.items() if len(paths) >= 2 and "#" in pattern
    ]
    if not leaf:
        stacks = []
    sources: list[Source] = []
    in_stack: set[Path] = set()
    if stacks:
        pattern, largest = max(stacks, key=lambda found: len(found[1]))
        # Same-named grayscale images of another size belong to the volume too (an odd-size B-scan):
        # reading then reports "B-scans differ in size" instead of dropping a slice or calling it a
        # fundus photo.
        largest = [p for p, header in images if header.grayscale and numbered_pattern(p.name) == pattern]
        in_stack = set(largest)
        ordered = tuple(sorted(largest, key=lambda p: natural_key(p.name)))
        only_stack = len(largest) == len(images)
        path = directory if only_stack else directory / numbered_pattern(ordered[0].name).replace("#", "*")
        sources.append(Source(path, "bscan-folder", ("oct",), members=ordered, format="bscan-folder"))
    for path, header in images:
        if path not in in_stack:
            sources.append(Source(path, "image", ("fundus",), format=header.format))
    return sources


def scan_iter(paths, *, metas: bool = True) -> Iterator[Source | ReadError | Ignored]:
    """Discover sources under files and folders, passing each on as soon as it is known.

    Yields `Source`s (order kept; duplicates dropped), `ReadError`s and `Ignored(path, why)` as they are
    found: a single file right after its header is read; a B-scan stack, a single-frame DICOM series or
    a HEYEX export once its folder has been listed. Nothing found is kept after it is yielded.

    `metas=False` (what `retina embed` uses): a DICOM file's header is parsed (once) and only what
    classifies and sizes it is converted here; its metadata and the rest of its pixel module are
    converted by the reader, guarded the same way (a broken element is then that file's read error),
    and `Source.metas` computes them on first use. The source keeps its whole dataset until read."""
    scanner = _Scanner(metas)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        for _ in scanner.scan_path(Path(path)):
            yield from scanner.drain()
        yield from scanner.drain()


def scan(paths) -> Discovery:
    """Discover sources under files and folders (order kept; duplicates dropped): `scan_iter`, collected."""
    result = Discovery()
    for found in scan_iter(paths):
        if isinstance(found, Source):
            result.sources.append(found)
        elif isinstance(found, ReadError):
            result.errors.append(found)
        else:
            result.ignored.append(tuple(found))
    return result
