"""DICOM: multi-frame OPT volumes, single-frame B-scan series, OP (and other photographic) fundus images.

Modality comes from the SOP Class (OPT -> oct; OP 8/16 bit, wide-field OP, VL photographic -> fundus),
then from the Modality attribute for generic classes (secondary capture). A multi-frame OP is a stereo
pair or an angiography sequence of photographs, not a volume: it reads as a fundus image (first frame).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import ReadError
from retinacli.items import FundusImage, ImageMeta, OctVolume
from retinacli.readers.common import (
    as_fundus_array,
    check_sample_budget,
    header_int,
    max_pixels,
    natural_key,
    normalise_laterality,
    open_failure,
    short,
    to_grayscale,
)
from retinacli.readers.sanitize import (
    device_name,
    iso_date,
    iso_datetime,
    iso_dicom_datetime,
    photometric,
    scrub,
)

# pydicom warns (UserWarning) about every odd value it meets in a broken file; the reader reports
# what matters as one ReadError, so these lines would only be noise on stderr. Installed once, at
# import (not per call: warnings.catch_warnings is not thread-safe).
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")

OPT_SOP = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
FUNDUS_SOPS = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit",
    "1.2.840.10008.5.1.4.1.1.77.1.5.5": "Wide Field Ophthalmic Photography (stereographic)",
    "1.2.840.10008.5.1.4.1.1.77.1.5.6": "Wide Field Ophthalmic Photography (3D coordinates)",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image",
}
# Generic image classes: decided by the Modality attribute (and frame count).
GENERIC_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture (single and multi-frame)
    "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL endoscopic etc. ("XC"/"ES" photos)
)
NOT_HANDLED_SOPS = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.3": "stereometric relationship (no image)",
    "1.2.840.10008.5.1.4.1.1.77.1.5.7": "OCT en face image (a derived projection, not a fundus photo)",
    "1.2.840.10008.5.1.4.1.1.77.1.5.8": "OCT B-scan volume analysis (no image)",
}


def has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


# Maps a volume's B-scan count to the indices of the B-scans wanted (e.g. preprocess.slice_indices).
FramePicker = Callable[[int], Sequence[int]]

# Elements larger than this are read from disk only when used: the pixel data of a full read stays
# on disk until the header has passed the size guard (one parse of the file, not two).
DEFER_SIZE = 64 * 1024
PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # float, double float, pixel data


def read_header(path: Path, with_pixels: bool = True, check: bool = True):
    """The file's one parse: its header, with the pixel data element deferred (its value stays on disk
    until decoded: ``load_pixels`` reads it from this dataset, without parsing the file again).

    Discovery keeps this dataset on its ``Source`` (``Source.header``) and the reader decodes from
    it. Every header element a reader uses is converted here, guarded (``check_used_elements``): a
    value pydicom cannot convert is one ReadError naming its tag, never its value. Other elements
    are not converted. ``check=False`` converts none: discovery then classifies the file
    (``classify_header``) and the reader converts the rest, guarded the same way (``ensure_checked``).
    ``with_pixels=False`` stops before the pixel data instead. The file is opened once: the deflate
    check reads its first bytes from the handle pydicom then parses.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    options = {"defer_size": DEFER_SIZE} if with_pixels else {"stop_before_pixels": True}
    handle = open_for_reading(path)
    try:
        with handle:
            head = handle.read(_META_HEAD)
            if not head:
                raise ReadError(path, "empty file (0 bytes)")
            if _may_be_deflated(head):
                check_deflated(path)
            handle.seek(0)
            try:
                ds = pydicom.dcmread(handle, **options)
            except InvalidDicomError:
                # Old files without the 128-byte preamble: accept only if they parse into image attributes.
                handle.seek(0)
                ds = pydicom.dcmread(handle, force=True, **options)
                if "SOPClassUID" not in ds and "Rows" not in ds:
                    raise ReadError(path, "not a DICOM file") from None
    except ReadError:
        raise
    except (EOFError, OSError) as exc:
        raise ReadError(path, f"truncated or unreadable DICOM header ({short(exc)})") from None
    except Exception as exc:  # pydicom raises many types on garbage input
        raise ReadError(path, f"not a DICOM file ({short(exc)})") from None
    if "SOPClassUID" not in ds and "Rows" not in ds:
        raise ReadError(path, "not a DICOM file")
    if check:
        check_used_elements(path, ds)
    _leave_pixels_on_disk(ds)
    return ds


def open_for_reading(path: Path) -> io.BufferedReader:
    """``open(path, "rb")`` for pydicom to parse, without blocking on a FIFO (O_NONBLOCK changes nothing
    for a regular file); a failure is one ReadError: a file retina may not read is reported as such,
    not as a broken image."""
    try:
        return io.BufferedReader(_PositionKeepingFile(os.fspath(path), "r", opener=_open_nonblocking))
    except OSError as exc:
        raise open_failure(path, exc) from None


def _open_nonblocking(name, flags: int) -> int:
    return os.open(name, flags | getattr(os, "O_NONBLOCK", 0))


class _PositionKeepingFile(io.FileIO):
    """A file that knows its position. pydicom asks a buffered file's position once per element, and
    the buffered reader asks its raw file each time: a system call (lseek, which also lets go of the
    GIL) per element, ~85 per header. Here that is an attribute read; reads and seeks update it."""

    _position = 0

    def readinto(self, buffer) -> int | None:
        count = super().readinto(buffer)
        self._position += count or 0
        return count

    def read(self, size: int = -1) -> bytes | None:
        data = super().read(size)
        self._position += len(data or b"")
        return data

    def readall(self) -> bytes:
        data = super().readall()
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._position = super().seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position


# What decoding needs once the metadata is computed (header_meta keeps it on the dataset): the
# image pixel module (group 0028, palettes and ICC profile included), the pixel data, and what
# classifies the file. Specific Character Set stays so the remaining texts read as before.
_DECODE_GROUPS = {0x0028, 0x7FE0}
_DECODE_TAGS = {0x00080005, 0x00080016, 0x00080060}  # charset, SOP Class UID, Modality


def keep_for_decoding(ds) -> None:
    """Drop from a discovered dataset every element decoding does not need (its metadata was computed
    and kept already): a Source waiting to be read then holds a third of the parsed header."""
    _cached_meta(ds)  # computed (and kept) before the elements it reads go
    tags = list(ds.keys())
    for tag in tags:
        if tag.group not in _DECODE_GROUPS and tag not in _DECODE_TAGS:
            del ds[tag]


def _leave_pixels_on_disk(ds) -> None:
    """Pixel data under DEFER_SIZE is read with the header; drop it (keeping its place in the file), so
    a dataset waiting in discovery's sources never holds pixels, however small."""
    from pydicom.dataelem import RawDataElement

    element = ds.get_item(0x7FE00010, keep_deferred=True)
    if isinstance(element, RawDataElement) and element.value is not None and isinstance(ds.filename, str):
        ds[0x7FE00010] = element._replace(value=None)


DEFLATED_UID = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole data set is zlib
_INFLATE_HEAD = 1 << 20  # inflated bytes parsed for Rows/Columns/...: the header precedes the pixels
_INFLATE_SLACK = 16 << 20  # header, overlays and icon beyond the pixel data


def check_deflated(path: Path) -> None:
    """A deflated data set is inflated whole by pydicom when the file is opened, before any header
    value can be checked: a 500 KB file can inflate to gigabytes. Inflate it here first as a stream
    (constant memory), and refuse it when it inflates to more than its header's pixel data (within the
    `--max-pixels` budget) plus a small slack."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        with open(path, "rb") as handle:
            head = handle.read(_META_HEAD)
    except OSError:
        head = b""  # pydicom's meta reader below reports it
    if not _may_be_deflated(head):
        return
    with open(path, "rb") as handle:
        try:
            read_preamble(handle, True)
            meta = _read_file_meta_info(handle)
        except Exception:
            return  # not a DICOM with file meta: dcmread reports it
        if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_UID:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        head = bytearray()
        cap = max_pixels() * 8 + _INFLATE_SLACK  # until the header is known: 8 bytes a sample
        total, pending, header_read = 0, b"", False
        while True:
            if not pending:
                pending = handle.read(1 << 16)
                if not pending:
                    break
            try:
                out = inflater.decompress(pending, 1 << 20)
            except zlib.error:
                return  # broken stream: dcmread reports it
            pending = inflater.unconsumed_tail
            total += len(out)
            if not header_read:
                head += out[: _INFLATE_HEAD - len(head)]
                if len(head) >= _INFLATE_HEAD or inflater.eof:
                    header_read = True
                    cap = min(cap, _pixel_bytes(path, bytes(head)) + _INFLATE_SLACK)
            if total > cap:
                raise ReadError(
                    path,
                    f"deflated data set too large: inflates to more than {cap / 1e6:.0f} MB, more than "
                    "its pixel data needs (or over --max-pixels)",
                )
            if inflater.eof:
                break


_META_HEAD = 4096  # file meta groups are a few hundred bytes


def _may_be_deflated(head: bytes) -> bool:
    """False only when the file meta group, read as bytes, is whole in the file's first bytes `head` and
    does not hold the deflated transfer syntax UID (the usual file: no meta parse needed); True
    otherwise, and pydicom's meta reader decides. The group starts with its length, (0002,0000) UL, at
    byte 132."""
    if head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return True
    end = 144 + int.from_bytes(head[140:144], "little")
    return end > len(head) or DEFLATED_UID.encode() in head[132:end]


def _pixel_bytes(path: Path, head: bytes) -> int:
    """Bytes of pixel data the header at the start of an inflated data set declares (ReadError over
    the budget); a header that does not parse allows the budget at 8 bytes a sample."""
    import pydicom
    from pydicom.filebase import DicomBytesIO

    fallback = max_pixels() * 8
    try:
        ds = pydicom.dcmread(DicomBytesIO(head), force=True, stop_before_pixels=True)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
        frames = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except Exception:
        return fallback
    if rows <= 0 or cols <= 0:
        return fallback
    check_sample_budget(path, (frames, rows, cols, samples))
    return frames * rows * cols * samples * ((bits + 7) // 8)


class BrokenTag(Exception):
    """A header element pydicom cannot convert; carries its tag only (the value could be a name)."""

    def __init__(self, tag) -> None:
        super().__init__(str(tag))
        self.tag = tag


def _get(ds, keyword: str, default=None):
    """``ds.get(keyword, default)``, guarded: an element pydicom cannot convert raises BrokenTag.

    pydicom converts a value on first access and keeps it, so an element that passed here once
    (``check_used_elements``) reads without a guard afterwards."""
    if ds is None:
        return default
    try:
        return ds.get(keyword, default)
    except Exception:
        from pydicom.datadict import tag_for_keyword
        from pydicom.tag import Tag

        number = tag_for_keyword(keyword)
        raise BrokenTag(Tag(number) if number is not None else keyword) from None


def broken_header(path: Path, exc: BrokenTag) -> ReadError:
    return ReadError(path, f"broken DICOM header (invalid value in tag {exc.tag})")


# Image pixel module and file meta elements the readers and pydicom's decoders use.
PIXEL_KEYWORDS = (
    "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames",
)


def check_used_elements(path: Path, ds) -> None:
    """Convert, guarded, every header element the readers and discovery use (classification, the
    metadata, the series order, the pixel module): one ReadError naming the tag for a value pydicom
    cannot convert. The rest of the header is never converted: its problems are not ours."""
    try:
        _get(getattr(ds, "file_meta", None), "TransferSyntaxUID")
        for keyword in PIXEL_KEYWORDS:
            _get(ds, keyword)
        classify(ds)
        _cached_meta(ds)
        if is_single_bscan(ds):  # what orders a series of single-frame B-scans
            _series_elements(ds)
    except BrokenTag as exc:
        raise broken_header(path, exc) from None
    ds._retina_checked = True


def classify_header(path: Path, ds) -> tuple[str | None, str, bool]:
    """Discovery's classification, guarded: (modality, description, one single-frame B-scan?) with a
    broken element one ReadError naming the tag. Of a header read with ``check=False`` it converts only
    what classifies the file (SOP class, frame count; Modality and samples of generic classes): the
    metadata, size and rest of the pixel module are the reader's (``ensure_checked``, then its size
    guard). A single-frame B-scan is checked whole: discovery decides which files make up its series,
    so a broken one is left out there."""
    try:
        modality, description = classify(ds)
        single_bscan = modality == "oct" and frame_count(ds) == 1
    except BrokenTag as exc:
        raise broken_header(path, exc) from None
    if single_bscan:
        ensure_checked(path, ds)
    return modality, description, single_bscan


def ensure_checked(path: Path, ds) -> None:
    """``check_used_elements`` unless it has run on this dataset (discovery with ``check=False`` left
    it to the reader): a broken element is then this file's one ReadError at read time."""
    if not getattr(ds, "_retina_checked", False):
        check_used_elements(path, ds)


def _series_elements(ds) -> None:
    """What groups (SeriesInstanceUID) and orders a series of single-frame B-scans."""
    _get(ds, "SeriesInstanceUID")
    _get(ds, "InstanceNumber")
    _get(ds, "ImageOrientationPatient")
    _position(ds)
    _frame_location_y(ds)


def header_free_reason(exc: BaseException, ds) -> str:
    """`short` (quoted values taken out) with every text value of the file's header taken out too: a
    decoder's message may quote a header value without quotes (e.g. a mistyped PhotometricInterpretation)."""
    return scrub(short(exc), ds)


def frame_count(ds) -> int:
    return max(_int_or(ds, "NumberOfFrames", 1), 1)


def _int_or(ds, keyword: str, default: int) -> int:
    """An integer header value, or `default` when absent or not a number (check_size reports that)."""
    try:
        return int(_get(ds, keyword, default) or default)
    except (TypeError, ValueError, OverflowError):
        return default


def classify(ds) -> tuple[str | None, str]:
    """('oct' | 'fundus' | None, description). None: a DICOM object retina does not read (with why)."""
    sop = str(_get(ds, "SOPClassUID", ""))
    if sop == OPT_SOP:
        return "oct", "Ophthalmic Tomography"
    if sop in FUNDUS_SOPS:
        return "fundus", FUNDUS_SOPS[sop]
    if sop in NOT_HANDLED_SOPS:
        return None, NOT_HANDLED_SOPS[sop]
    if "Rows" not in ds or "Columns" not in ds:
        name = _sop_name(sop)
        return None, f"DICOM object without an image ({name})" if name else "DICOM object without an image"
    if sop.startswith(GENERIC_IMAGE_SOP_PREFIXES) or not sop:
        modality = str(_get(ds, "Modality", "")).upper()  # read only where the SOP class leaves it open
        if modality == "OPT":
            return "oct", "OCT (generic image class)"
        if modality in {"OP", "XC", "SM"}:
            return "fundus", "photograph (generic image class)"
        if frame_count(ds) > 1 and _int_or(ds, "SamplesPerPixel", 1) == 1:
            return "oct", "grayscale multi-frame image"
        return "fundus", "single-frame image"
    return None, f"unsupported DICOM image class ({_sop_name(sop) or sop})"


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(text: str) -> bool:
    """A well-formed DICOM UID: digits and dots, at most 64 characters."""
    return bool(_UID.match(text)) and len(text) <= 64


def _sop_name(sop: str) -> str:
    from pydicom.uid import UID

    if not is_uid(sop):
        return "invalid SOP Class UID"
    try:
        name = UID(sop).name
    except Exception:
        return sop
    return name if name != sop else sop


def is_single_bscan(ds) -> bool:
    """One B-scan per file: these files are grouped into a volume by series."""
    return classify(ds)[0] == "oct" and frame_count(ds) == 1


def _dicom_datetime(ds, prefix: str) -> str | None:
    return iso_datetime(_get(ds, f"{prefix}Date"), _get(ds, f"{prefix}Time"))


def acquisition_datetime(ds) -> str | None:
    """``YYYY-MM-DDTHH:MM:SS`` from AcquisitionDateTime, else the first valid date (+ time) of the
    acquisition, content, series or study; never the header's text itself (sanitize.py)."""
    found = iso_dicom_datetime(_get(ds, "AcquisitionDateTime"))
    if found:
        return found
    for prefix in ("Acquisition", "Content", "Series", "Study"):
        found = _dicom_datetime(ds, prefix)
        if found:
            return found
    return None


def _first(sequence_owner, keyword: str):
    seq = _get(sequence_owner, keyword)
    return seq[0] if seq else None


def _pixel_spacing_2d(ds) -> tuple[float, float] | None:
    """Shared functional groups, then the image, then the first frame's (looked at only when the others
    have none: converting the per-frame sequence costs more than parsing the file)."""
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    found = _spacing_of(_first(shared, "PixelMeasuresSequence")) or _spacing_of(ds)
    if found is None:
        found = _spacing_of(_first(_first(ds, "PerFrameFunctionalGroupsSequence"), "PixelMeasuresSequence"))
    return found


def _spacing_of(owner) -> tuple[float, float] | None:
    value = _get(owner, "PixelSpacing")
    if not value:
        return None
    try:
        row, col = (float(v) for v in value[:2])
    except (TypeError, ValueError):
        return None
    return row, col


def _slice_spacing(ds) -> float | None:
    for owner in (ds, _first(_first(ds, "SharedFunctionalGroupsSequence"), "PixelMeasuresSequence")):
        if owner is None:
            continue
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            if _get(owner, keyword) not in (None, ""):
                try:
                    return float(_get(owner, keyword))
                except (TypeError, ValueError):
                    pass
    return None


def referenced_uids(ds) -> tuple[str, ...]:
    """Localizer links: ReferencedImageSequence (and a top-level Ophthalmic Frame Location Sequence);
    without either, the per-frame Ophthalmic Frame Location references.

    Per-frame locations name the localizer image the Referenced Image Sequence names; reading them
    converts one dataset per B-scan (several times the cost of parsing the file), so they are read
    only when the volume has no other reference."""
    found: list[str] = []

    def add(item) -> None:
        uid = _get(item, "ReferencedSOPInstanceUID")
        if uid and str(uid) not in found:
            found.append(str(uid))

    for item in _get(ds, "ReferencedImageSequence") or []:
        add(item)
    for item in _get(ds, "OphthalmicFrameLocationSequence") or []:
        add(item)
    if not found:
        for frame in _get(ds, "PerFrameFunctionalGroupsSequence") or []:
            for item in _get(frame, "OphthalmicFrameLocationSequence") or []:
                add(item)
    return tuple(found)


def header_meta(ds) -> ImageMeta:
    """The metadata of one DICOM dataset (a fresh copy each call: callers edit theirs); computed once
    per dataset (discovery and the reader share it)."""
    cached = _cached_meta(ds)
    # every field is immutable (text, numbers, tuples) but `extra`, whose values are too
    return dataclasses.replace(cached, extra=dict(cached.extra))


class HeaderMetas(Mapping):
    """``{modality: ImageMeta}`` of a discovered DICOM file whose metadata was not read yet (discovery
    with ``check=False``): computed from its dataset on first use, with the reader's guard, so a broken
    element is the file's one ReadError naming the tag (raised by the lookup). Picklable: it holds the
    path, the modality and the dataset, no function."""

    def __init__(self, path: Path, modality: str, ds) -> None:
        self.path, self.modality, self.ds = path, modality, ds

    def __getitem__(self, modality: str) -> ImageMeta:
        if modality != self.modality:
            raise KeyError(modality)
        ensure_checked(self.path, self.ds)
        return header_meta(self.ds)

    def __iter__(self):
        return iter((self.modality,))

    def __len__(self) -> int:
        return 1

    def __repr__(self) -> str:  # never reads the header
        return f"HeaderMetas({self.modality!r}, read on first use)"


def _cached_meta(ds) -> ImageMeta:
    """The dataset's metadata, computed on first use and kept on it (not a copy: do not edit)."""
    cached = getattr(ds, "_retina_meta", None)
    if cached is None:
        cached = _header_meta(ds)
        ds._retina_meta = cached
    return cached


def _header_meta(ds) -> ImageMeta:
    modality, _ = classify(ds)
    laterality = normalise_laterality(_get(ds, "ImageLaterality")) or normalise_laterality(
        _get(ds, "Laterality"))
    if laterality is None:
        shared = _first(ds, "SharedFunctionalGroupsSequence")
        frame_anatomy = _first(shared, "FrameAnatomySequence")
        if frame_anatomy is not None:
            laterality = normalise_laterality(_get(frame_anatomy, "FrameLaterality"))
    device = device_name(_get(ds, "Manufacturer"), _get(ds, "ManufacturerModelName"))
    spacing2d = _pixel_spacing_2d(ds)
    spacing: tuple[float, ...] | None = spacing2d
    if modality == "oct" and spacing2d is not None:
        slice_spacing = _slice_spacing(ds)
        spacing = (slice_spacing if slice_spacing is not None else float("nan"), *spacing2d)
    return ImageMeta(
        laterality=laterality,
        study_date=iso_date(_get(ds, "StudyDate")),
        acquisition_datetime=acquisition_datetime(ds),
        device=device,
        pixel_spacing_mm=spacing,
        patient_id=str(_get(ds, "PatientID", "") or "") or None,
        patient_name=str(_get(ds, "PatientName", "") or "") or None,
        accession_number=str(_get(ds, "AccessionNumber", "") or "") or None,
        study_uid=str(_get(ds, "StudyInstanceUID", "") or "") or None,
        series_uid=str(_get(ds, "SeriesInstanceUID", "") or "") or None,
        sop_instance_uid=str(_get(ds, "SOPInstanceUID", "") or "") or None,
        referenced_sop_uids=referenced_uids(ds),
        photometric=photometric(_get(ds, "PhotometricInterpretation")),
        extra={"sop_class": _sop_name(str(_get(ds, "SOPClassUID", "")))},
    )


def check_size(path: Path, ds) -> None:
    rows = header_int(path, ds, "Rows", 0)
    cols = header_int(path, ds, "Columns", 0)
    if rows <= 0 or cols <= 0:
        raise ReadError(path, f"invalid image size in header (Rows={rows}, Columns={cols})")
    samples = header_int(path, ds, "SamplesPerPixel", 1)
    bits = header_int(path, ds, "BitsAllocated", 8)
    if samples not in (1, 3, 4) or bits not in (1, 8, 16, 32, 64):
        raise ReadError(path, f"unsupported pixel layout (SamplesPerPixel={samples}, BitsAllocated={bits})")
    frames = header_int(path, ds, "NumberOfFrames", 1)
    if frames <= 0:
        frames = 1  # 0 is how some writers say "one frame"; a negative count is read the same way
    check_sample_budget(path, (frames, rows, cols, samples))


def _transfer_syntax_problem(ds) -> str | None:
    """A reason when no installed plugin decodes this file's transfer syntax, else None."""
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid is None:
        return None
    if not is_uid(str(uid)):
        return "invalid transfer syntax UID in the file meta header"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"unsupported transfer syntax {uid.name} ({uid})"
    if decoder.is_available:
        return None
    return f"unsupported transfer syntax {uid.name} ({uid}): {_decoder_hint(uid)}"


def _decoder_hint(uid) -> str:
    """The pip command that installs a decoder for this transfer syntax (pydicom's plugins)."""
    name = uid.name.lower()
    if "2000" in name or "htj2k" in name or "high-throughput" in name:
        return "pip install pylibjpeg pylibjpeg-openjpeg"
    if "jpeg-ls" in name or "jpeg ls" in name:
        return "pip install pyjpegls"  # MIT; pylibjpeg-libjpeg decodes it too but is GPL
    if "jpeg" in name:
        return "pip install pylibjpeg pylibjpeg-libjpeg (GPL-3.0) or python-gdcm"
    if "rle" in name:
        return "pip install pylibjpeg pylibjpeg-rle"
    return "pip install python-gdcm"


def load_pixels(path: Path, header=None, frames=None) -> tuple[Any, np.ndarray]:
    """Read with the guards: size cap first (header), then decode with one-line reasons.

    `header` from ``read_header(path)`` (discovery's dataset) is decoded as it is, without parsing
    the file again; none means one read here. `frames` (frame indices, repeats allowed): only those
    frames, in that order, with a leading frame axis; uncompressed data reads only their bytes and
    encapsulated data decodes only those frames (others: full decode, then the frames picked).
    """
    if header is not None and _changed_since_parsed(header):  # rewritten since discovery: offsets moved
        header = None
    ds = header if header is not None else read_header(path)
    # the pixel bytes read now are dropped again afterwards: a Source keeps its header (the dataset)
    # while it waits, and must not keep its pixels too
    deferred = ds.get_item(0x7FE00010, keep_deferred=True)
    try:
        return _load_pixels(path, ds, frames)
    except BrokenTag as exc:
        raise broken_header(path, exc) from None
    finally:
        if deferred is not None and deferred.value is None:
            ds[0x7FE00010] = deferred


def _changed_since_parsed(ds) -> bool:
    """Whether the file `ds` was parsed from has been modified since (pydicom keeps its mtime)."""
    filename, parsed = getattr(ds, "filename", None), getattr(ds, "timestamp", None)
    if not isinstance(filename, str) or parsed is None:
        return False
    try:
        return Path(filename).stat().st_mtime != parsed
    except OSError:
        return False  # gone: the read reports it


def _load_pixels(path: Path, ds, frames) -> tuple[Any, np.ndarray]:
    check_size(path, ds)
    stated = _get(ds, "PhotometricInterpretation")
    if stated not in (None, "") and photometric(stated) is None:  # its text is never quoted
        raise ReadError(path, "unsupported PhotometricInterpretation in header (not a DICOM defined term)")
    problem = _transfer_syntax_problem(ds)
    if problem:
        raise ReadError(path, problem)
    if not _holds_pixel_element(ds):  # a header read with stop_before_pixels: read the file
        ds = read_header(path)
    if not _holds_pixel_element(ds):
        raise ReadError(path, "no pixel data (truncated file or not an image)")
    _check_native_length(path, ds)
    _check_codestreams(path, ds)
    wanted = None if frames is None else _frame_indices(path, ds, frames)
    picked = False
    try:
        if wanted is not None:
            pixels = _selected_frames(path, ds, sorted(set(wanted)))
            picked = pixels is not None
        if not picked:
            pixels = _whole_native(ds)
            if pixels is None:
                pixels = decoded_pixels(ds)
    except ReadError:
        raise
    except Exception as exc:
        text = str(exc)
        if "less than expected" in text or "truncated" in text.lower() or isinstance(exc, EOFError):
            raise ReadError(path, "truncated pixel data") from None
        raise ReadError(path, f"cannot decode pixel data ({header_free_reason(exc, ds)})") from None
    try:
        pixels = _to_display_values(ds, pixels)
    except ReadError:
        raise
    except Exception as exc:  # e.g. PALETTE COLOR without its lookup tables
        reason = header_free_reason(exc, ds)
        raise ReadError(path, f"cannot convert pixel data to display values ({reason})") from None
    if wanted is None:
        return ds, pixels
    if picked:  # the unique frames, ascending: map each wanted index to its row
        unique = sorted(set(wanted))
        if wanted == unique and pixels.flags.writeable:
            return ds, pixels  # already in order, and an array of its own
        rows = {frame: row for row, frame in enumerate(unique)}
        return ds, pixels[[rows[i] for i in wanted]]
    if frame_count(ds) == 1:  # a one-frame decode has no frame axis
        pixels = pixels[None]
    return ds, pixels[wanted]


def _frame_indices(path: Path, ds, frames) -> list[int]:
    wanted = [int(i) for i in frames]
    count = frame_count(ds)
    if not wanted or min(wanted) < 0 or max(wanted) >= count:
        raise ValueError(f"{path}: frame indices must lie in 0..{count - 1}")
    return wanted


# Transfer syntaxes whose frames lie uncompressed at fixed offsets in file order (deflated ones lie in
# the inflated stream, big endian is retired: both decoded whole).
_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _selected_frames(path: Path, ds, unique: list[int]) -> np.ndarray | None:
    """The decoded `unique` frames (ascending) as (k, rows, columns[, samples]), or None when this file
    is decoded whole and picked (signed values, whose display conversion looks at every frame, and
    layouts without fixed-size frames)."""
    if frame_count(ds) <= 1 or _int_or(ds, "PixelRepresentation", 0) != 0 or "PixelData" not in ds:
        return None
    uid = ds.file_meta.get("TransferSyntaxUID")
    if uid is not None and uid.is_compressed:
        from pydicom.pixels import iter_pixels

        return np.stack(list(iter_pixels(ds, indices=unique)))
    if str(uid) in _NATIVE_LITTLE_ENDIAN:
        return _native_frames(ds, unique)
    return None


def _whole_native(ds) -> np.ndarray | None:
    """Every frame of plain uncompressed data (see `_native_frames`) read straight into the array, in
    pydicom's layout (no frame axis for one frame); None: pydicom decodes it."""
    native = str(ds.file_meta.get("TransferSyntaxUID")) in _NATIVE_LITTLE_ENDIAN
    if not native or _int_or(ds, "PixelRepresentation", 0) != 0 or "PixelData" not in ds:
        return None
    count = frame_count(ds)
    pixels = _native_frames(ds, list(range(count)), plain_only=True)
    return pixels[0] if pixels is not None and count == 1 else pixels


def _native_frames(ds, unique: list[int], plain_only: bool = False) -> np.ndarray | None:
    """Uncompressed frames read from their offsets (the deferred element's place in the file): plain
    layouts straight into the array, others decoded by pydicom as a dataset holding just those frames
    (the same conversion as a full decode). None when the data is short or odd: pydicom decodes it."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset

    bits = _int_or(ds, "BitsAllocated", 8)
    photometric_text = str(_get(ds, "PhotometricInterpretation", "") or "").upper()
    if bits not in (8, 16, 32) or "422" in photometric_text or "420" in photometric_text:
        return None  # bit-packed or subsampled frames do not lie at whole-byte frame offsets
    frame_bytes = int(ds.Rows) * int(ds.Columns) * _int_or(ds, "SamplesPerPixel", 1) * bits // 8
    needed = frame_count(ds) * frame_bytes
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    value = getattr(element, "value", None)
    if value is not None and len(value) < needed:
        return None  # short data: the full decode reports it
    if value is None:
        start = getattr(element, "value_tell", None)
        filename = getattr(ds, "filename", None)
        length = getattr(element, "length", 0)
        if start is None or not isinstance(filename, str) or length == 0xFFFFFFFF or length < needed:
            return None
    # Grayscale, or RGB stored pixel by pixel, in whole unsigned bytes: pydicom's native decode is the
    # bytes read as unsigned integers in (frames, rows, columns[, 3]), so they are read straight into
    # that array; other layouts go through pydicom.
    samples = _int_or(ds, "SamplesPerPixel", 1)
    plain = (samples == 1 and photometric_text.startswith("MONOCHROME")) or (
        samples == 3 and photometric_text == "RGB" and _get(ds, "PlanarConfiguration") == 0)
    if plain_only and not plain:
        return None
    shape = (len(unique), int(ds.Rows), int(ds.Columns), *((3,) if samples == 3 else ()))
    if not plain:
        shape = (len(unique) * frame_bytes,)
    out = np.empty(shape, np.dtype(f"<u{bits // 8}") if plain else np.uint8)
    target = memoryview(out.reshape(-1).view(np.uint8))
    if value is not None:  # small enough to have been read with the header
        for k, i in enumerate(unique):
            target[k * frame_bytes : (k + 1) * frame_bytes] = value[i * frame_bytes : (i + 1) * frame_bytes]
    else:
        with open(filename, "rb") as handle:
            if Path(filename).stat().st_size < start + needed:
                return None  # truncated: the full decode reports it
            for k, i in enumerate(unique):
                handle.seek(start + i * frame_bytes)
                if handle.readinto(target[k * frame_bytes : (k + 1) * frame_bytes]) != frame_bytes:
                    return None
    if plain:
        return out
    mini = Dataset()
    mini.file_meta = FileMetaDataset()
    mini.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    for keyword in PIXEL_KEYWORDS:
        if keyword in ds and keyword != "NumberOfFrames":
            mini.add(ds.data_element(keyword))
    mini.NumberOfFrames = len(unique)
    mini["PixelData"] = DataElement(0x7FE00010, "OW" if bits > 8 else "OB", out.tobytes())
    pixels = decoded_pixels(mini, view_only=True)  # a view of those bytes: the caller's pick copies it
    return pixels[None] if len(unique) == 1 else pixels


def decoded_pixels(ds, **options) -> np.ndarray:
    """``ds.pixel_array`` without keeping the array on the dataset (pydicom caches it there)."""
    from pydicom.pixels import pixel_array

    return pixel_array(ds, **options)


def _holds_pixel_element(ds) -> bool:
    """Whether `ds` holds a pixel data element (a header read with stop_before_pixels does not)."""
    return any(tag in ds for tag in PIXEL_DATA_TAGS)


def _pixel_data_length(ds) -> int | None:
    """Bytes of the PixelData element, from its declared length when its value is still on disk
    (deferred: not read for this); None when unknown."""
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes | bytearray):
        return len(value)
    length = getattr(element, "length", None)
    if value is None and isinstance(length, int) and length != 0xFFFFFFFF:
        return length
    return None


def _check_native_length(path: Path, ds) -> None:
    """Uncompressed pixel data longer than the header's frames x rows x columns: the header is wrong
    (e.g. NumberOfFrames too small), so which frames are meant is unknown. (Shorter data is caught by
    the decoder as truncated.)"""
    if ds.file_meta.get("TransferSyntaxUID") is None or ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    actual = _pixel_data_length(ds)
    if actual is None:
        return
    try:
        bits = int(_get(ds, "BitsAllocated", 8) or 8)
        samples = int(_get(ds, "SamplesPerPixel", 1) or 1)
        expected_bits = frame_count(ds) * int(ds.Rows) * int(ds.Columns) * samples * bits
    except (TypeError, ValueError, AttributeError):
        return  # the decoder reports a broken header itself
    expected = (expected_bits + 7) // 8
    frames = frame_count(ds)
    if actual >= expected + max(expected // frames, 2):  # at least one whole frame more
        raise ReadError(
            path,
            f"pixel data does not match the header ({actual} bytes, NumberOfFrames={frames} x "
            f"{int(ds.Rows)}x{int(ds.Columns)} needs {expected})",
        )


# JPEG start-of-frame markers (baseline..lossless, arithmetic) and JPEG-LS SOF55: each holds the frame's
# size. C4 (DHT), C8 (reserved) and CC (DAC) are not frames.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_HEAD_BYTES = 65536  # a frame's size is declared in its first bytes; nothing further is looked at


def codestream_size(head: bytes) -> tuple[str, int, int, int] | None:
    """(kind, width, height, components) a compressed frame declares in its first bytes, or None.

    JPEG 2000: the SIZ marker of a raw codestream (after SOC) or inside a JP2 file; JPEG / JPEG-LS:
    the start-of-frame marker. A frame whose size the decoder takes from the DICOM header (RLE,
    deflate) gives None."""
    if head[:2] == b"\xff\x4f" or head[4:8] == b"jP  ":  # raw codestream, or a JP2 file holding one
        at = head.find(b"\xff\x4f\xff\x51")
        if at < 0 or len(head) < at + 4 + 38:
            return None
        siz = head[at + 4 :]
        xsiz, ysiz, xosiz, yosiz = (int.from_bytes(siz[4 + 4 * i : 8 + 4 * i], "big") for i in range(4))
        components = int.from_bytes(siz[36:38], "big")
        return "JPEG 2000", max(xsiz - xosiz, 0), max(ysiz - yosiz, 0), components
    if head[:2] == b"\xff\xd8":
        at = 2
        while at + 4 <= len(head):
            if head[at] != 0xFF:
                return None
            marker = head[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
                continue
            if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
                at += 2
                continue
            length = int.from_bytes(head[at + 2 : at + 4], "big")
            if marker in _JPEG_SOF:
                if at + 10 > len(head):
                    return None
                height = int.from_bytes(head[at + 5 : at + 7], "big")
                width = int.from_bytes(head[at + 7 : at + 9], "big")
                kind = "JPEG-LS" if marker == 0xF7 else "JPEG"
                return kind, width, height, head[at + 9]
            if marker == 0xDA or length < 2:  # scan data before any frame header: give up
                return None
            at += 2 + length
    return None


def _frame_heads(ds):
    """The first bytes of each compressed frame: the first fragment of every frame (a frame's first
    fragment starts with its codestream's start marker), read without joining whole frames."""
    from pydicom.encaps import generate_fragments

    data = ds.get("PixelData")
    if not isinstance(data, bytes | bytearray):
        return
    for fragment in generate_fragments(data):
        if fragment[:2] in (b"\xff\x4f", b"\xff\xd8") or fragment[4:8] == b"jP  ":
            yield bytes(fragment[:_HEAD_BYTES])


def _check_codestreams(path: Path, ds) -> None:
    """Compressed pixel data: each frame's codestream says how large it decodes, and the decoder
    allocates that, whatever Rows/Columns say. Refuse (before decoding) a codestream over the budget
    or one that declares another size than the header."""
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid is None or not uid.is_compressed:
        return
    rows, cols = int(_get(ds, "Rows", 0) or 0), int(_get(ds, "Columns", 0) or 0)
    frames = frame_count(ds)
    try:
        heads = list(_frame_heads(ds))
    except Exception:
        return  # a broken item structure is the decoder's to report
    for number, head in enumerate(heads[:frames], start=1):
        declared = codestream_size(head)
        if declared is None:
            continue
        kind, width, height, components = declared
        check_sample_budget(path, (frames, height, width, max(components, 1)),
                            f"{kind} pixel data (frame {number})")
        if height == 0 and kind != "JPEG 2000":
            continue  # JPEG with the height in a later DNL marker: the decoder checks it
        if (width, height) != (cols, rows):
            raise ReadError(
                path,
                f"frame {number}'s {kind} codestream declares another image size than the header's "
                "Rows/Columns",
            )


def _to_display_values(ds, pixels: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (bright = low values) is inverted so every image reads bright = high."""
    photometric = str(_get(ds, "PhotometricInterpretation", "")).upper()
    if photometric == "MONOCHROME1":
        if np.issubdtype(pixels.dtype, np.unsignedinteger):
            bits = _int_or(ds, "BitsStored", pixels.dtype.itemsize * 8)
            top = min((1 << bits) - 1, np.iinfo(pixels.dtype).max)
            pixels = (top - np.minimum(pixels, top)).astype(pixels.dtype)
        else:
            pixels = (pixels.max() + pixels.min() - pixels).astype(pixels.dtype)
    elif photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
        if pixels.dtype == np.uint16 and int(_get(ds, "BitsAllocated", 8)) == 8:
            pixels = (pixels >> 8).astype(np.uint8)
    if pixels.dtype.kind == "i" and pixels.size:
        if pixels.min() >= 0:  # signed storage of unsigned values
            pixels = pixels.astype(np.uint16 if pixels.max() > 255 else np.uint8)
        else:  # truly signed values: float32 keeps them (items hold uint8 / uint16 / float32)
            pixels = pixels.astype(np.float32)
    elif (pixels.dtype.kind == "f" and pixels.dtype != np.float32) or pixels.dtype == np.uint32:
        pixels = pixels.astype(np.float32)
    return pixels


def read_dicom(
    path: Path, source_format: str = "dicom", header=None, oct_frames: FramePicker | None = None
) -> OctVolume | FundusImage:
    """One DICOM file: a multi-frame OCT volume (or a one-B-scan OPT) or a fundus image.

    `header`: discovery's dataset of this file (``read_header``), decoded without a second parse.
    `oct_frames` maps an OCT volume's B-scan count to the B-scans wanted: the volume then holds only
    those (in that order) and ``meta.extra["bscans"]`` the full count."""
    if header is None or _changed_since_parsed(header):  # rewritten since discovery: parse it again
        header = read_header(path)
    ensure_checked(path, header)  # the metadata and pixel module, when discovery left them to the reader
    try:
        modality, description = classify(header)
    except BrokenTag as exc:
        raise broken_header(path, exc) from None
    if modality is None:
        raise ReadError(path, f"not an OCT volume or fundus image: {description}")
    count = frame_count(header)
    wanted = list(oct_frames(count)) if modality == "oct" and oct_frames is not None else None
    ds, pixels = load_pixels(path, header, wanted)
    meta = header_meta(ds)
    samples = _int_or(ds, "SamplesPerPixel", 1)
    if modality == "oct":
        if samples > 1:  # RGB-rendered B-scans
            pixels = to_grayscale(pixels)
        if pixels.ndim == 2:
            pixels = pixels[None]
        if wanted is not None:
            meta.extra["bscans"] = count
        return OctVolume(str(path), np.ascontiguousarray(pixels), source_format, meta)
    if count > 1:
        pixels = pixels[0]
        meta.extra["frames"] = count
        meta.extra["note"] = f"multi-frame photograph ({count} frames): first frame used"
    return FundusImage(str(path), np.ascontiguousarray(as_fundus_array(path, pixels)), source_format, meta)


def _position(ds) -> np.ndarray | None:
    position = _get(ds, "ImagePositionPatient")
    if position is None:
        frame = _first(ds, "PerFrameFunctionalGroupsSequence")
        plane = _first(frame, "PlanePositionSequence")
        position = _get(plane, "ImagePositionPatient")
    try:  # a header value of the wrong kind (text, one number) is no position
        if position is None or len(position) != 3:
            return None
        return np.array([float(v) for v in position])
    except (TypeError, ValueError):
        return None


def _positions_along_scan_axis(datasets: list) -> list[float] | None:
    """Project each B-scan's position on the slice normal (or, without orientation, on the axis
    along which the positions spread the most)."""
    positions = [_position(ds) for ds in datasets]
    if any(p is None for p in positions):
        return None
    stacked = np.stack(positions)
    orientation = _get(datasets[0], "ImageOrientationPatient")
    axis = None
    try:
        values = np.array([float(v) for v in orientation]) if len(orientation or ()) == 6 else None
    except (TypeError, ValueError):
        values = None
    if values is not None:
        normal = np.cross(values[:3], values[3:])
        if np.linalg.norm(normal) > 0:
            axis = normal / np.linalg.norm(normal)
    if axis is None:
        axis = np.eye(3)[int(np.argmax(np.ptp(stacked, axis=0)))]
    return [float(v) for v in stacked @ axis]


def _frame_location_y(ds) -> float | None:
    """Ophthalmic Frame Location: B-scan line on the localizer; its row coordinate orders the scans."""
    items = list(_get(ds, "OphthalmicFrameLocationSequence") or [])
    for frame in _get(ds, "PerFrameFunctionalGroupsSequence") or []:
        items.extend(_get(frame, "OphthalmicFrameLocationSequence") or [])
    for item in items:
        coords = _get(item, "ReferenceCoordinates")
        try:
            if coords is not None and len(coords) >= 2:
                return float(coords[0])
        except (TypeError, ValueError):
            continue
    return None


def series_order(members: list[tuple[Path, Any]]) -> list[Path]:
    """Order single-frame B-scan files: patient position, else frame location, else InstanceNumber,
    else natural file-name order. The first key that every file has and that separates them wins."""

    def instance_number(ds) -> float | None:
        try:
            number = _get(ds, "InstanceNumber")
            return float(number) if number not in (None, "") else None
        except (TypeError, ValueError):
            return None

    datasets = [ds for _, ds in members]
    candidates = [
        _positions_along_scan_axis(datasets),
        [_frame_location_y(ds) for ds in datasets],
        [instance_number(ds) for ds in datasets],
    ]
    for values in candidates:
        if values is None:
            continue
        if all(v is not None for v in values) and len(set(values)) == len(values):
            order = sorted(range(len(members)), key=lambda i: values[i])
            return [members[i][0] for i in order]
    return sorted((path for path, _ in members), key=lambda p: natural_key(p.name))


def read_dicom_series(
    path: Path, members: tuple[Path, ...], headers=None, oct_frames: FramePicker | None = None
) -> OctVolume:
    """Single-frame B-scan files of one series (already ordered) -> one volume.

    `headers`: discovery's datasets of `members` (same order), decoded without parsing them again.
    `oct_frames`: only the B-scan files it picks are decoded (every member's size is still checked,
    from its header) and ``meta.extra["bscans"]`` holds the series' length."""
    if not members:
        raise ReadError(path, "empty B-scan series")
    if headers is None or len(headers) != len(members):
        headers = [None] * len(members)
    headers = [ds if ds is not None and not _changed_since_parsed(ds) else read_header(member)
               for member, ds in zip(members, headers, strict=True)]
    for member, ds in zip(members, headers, strict=True):
        ensure_checked(member, ds)
    try:
        return _read_series(path, members, list(headers), oct_frames)
    except BrokenTag as exc:
        raise broken_header(path, exc) from None


def _read_series(path: Path, members: tuple[Path, ...], headers: list, oct_frames) -> OctVolume:
    wanted = None if oct_frames is None else [int(i) for i in oct_frames(len(members))]
    if wanted is not None:
        if not wanted or min(wanted) < 0 or max(wanted) >= len(members):
            raise ValueError(f"{path}: B-scan indices must lie in 0..{len(members) - 1}")
        first = None
        for member, ds in zip(members, headers, strict=True):  # every member's size, from its header
            check_size(member, ds)
            size = (header_int(member, ds, "Rows", 0), header_int(member, ds, "Columns", 0))
            first = first or size
            if size != first:
                raise ReadError(path, f"B-scan {member.name} has shape {size}, the others {first}")
        check_sample_budget(path, (len(members), *first))
    chosen = range(len(members)) if wanted is None else sorted(set(wanted))
    scans: dict[int, np.ndarray] = {}
    shape = None
    for index in chosen:
        member = members[index]
        ds, pixels = load_pixels(member, headers[index])
        if _int_or(ds, "SamplesPerPixel", 1) > 1:
            pixels = to_grayscale(pixels)
        if pixels.ndim == 3:
            pixels = pixels[0]
        if shape is not None and pixels.shape != shape:
            raise ReadError(path, f"B-scan {member.name} has shape {pixels.shape}, the others {shape}")
        shape = pixels.shape
        scans[index] = pixels
        check_sample_budget(path, (len(members), *shape))  # the whole series, before the rest
    meta = header_meta(headers[0])
    for ds in headers[1:]:  # the localizer may be referenced by any B-scan
        for uid in referenced_uids(ds):
            if uid not in meta.referenced_sop_uids:
                meta.referenced_sop_uids = (*meta.referenced_sop_uids, uid)
    meta.sop_instance_uid = None  # the volume is many instances
    meta.extra["files"] = len(members)
    if wanted is not None:
        meta.extra["bscans"] = len(members)
    positions = _positions_along_scan_axis(headers) if len(headers) > 1 else None
    spacing2d = _pixel_spacing_2d(headers[0])
    if positions is not None and spacing2d is not None:
        meta.pixel_spacing_mm = (float(np.median(np.abs(np.diff(positions)))), *spacing2d)
    order = list(chosen) if wanted is None else wanted
    return OctVolume(str(path), np.stack([scans[i] for i in order]), "dicom-series", meta)
