"""DICOM: multi-frame OPT volumes, single-frame B-scan series, OP (and other photographic) fundus images.

Modality comes from the SOP Class (OPT -> oct; OP 8/16 bit, wide-field OP, VL photographic -> fundus),
then from the Modality attribute for generic classes (secondary capture). A multi-frame OP is a stereo
pair or an angiography sequence of photographs, not a volume: it reads as a fundus image (first frame).
"""

from __future__ import annotations

import re
import warnings
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


# Elements larger than this are read from disk only when used: the pixel data of a full read stays
# on disk until the header has passed the size guard (one parse of the file, not two).
DEFER_SIZE = 64 * 1024
PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # float, double float, pixel data


def read_header(path: Path, with_pixels: bool = False):
    """Header only (no pixel data): cheap enough for discovery on big folders.

    With ``with_pixels`` the dataset also holds the pixel data element, deferred: ``load_pixels``
    then decodes it without parsing the file a second time.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    options = {"defer_size": DEFER_SIZE} if with_pixels else {"stop_before_pixels": True}
    key = _file_key(path)  # one stat: the empty check, and "already checked" for a re-read
    try:
        if key is None:
            Path(path).stat()  # raises the OSError reported below
        elif key[2] == 0:
            raise ReadError(path, "empty file (0 bytes)")
        if key not in _VALIDATED:  # a file that passed here before, unchanged, was checked then
            check_deflated(path)
        try:
            ds = pydicom.dcmread(path, **options)
        except InvalidDicomError:
            # Old files without the 128-byte preamble: accept only if they parse into image attributes.
            ds = pydicom.dcmread(path, force=True, **options)
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
    parse_all_values(path, ds, key)
    return ds


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


# Files whose every header value converted (path, mtime, size), so discovery and the read that
# follows parse a file's header once: the conversion is most of the cost of reading an OPT volume.
_VALIDATED: set[tuple[str, int, int]] = set()
_VALIDATED_MAX = 100_000


def _file_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (str(path), st.st_mtime_ns, st.st_size)


def parse_all_values(path: Path, ds, key: tuple[str, int, int] | None) -> None:
    """pydicom converts values lazily, on first access; a broken value (bad VR, odd length) would then
    raise anywhere later. Converting every element here turns it into one ReadError up front, naming
    the tag only (the value could be a patient's name). Done once per unchanged file and process
    (`key`: the file's ``_file_key``)."""
    if key is not None and key in _VALIDATED:
        return
    file_meta = getattr(ds, "file_meta", None)
    for owner in (file_meta, ds):
        if owner is not None:
            _parse_dataset(path, owner)
    if key is not None:
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED.add(key)


def _parse_dataset(path: Path, ds, depth: int = 0) -> None:
    if depth > 8:
        raise ReadError(path, "broken DICOM header (sequences nested too deeply)")
    for tag in list(ds.keys()):
        if tag in PIXEL_DATA_TAGS:  # raw bytes, checked when decoded (and maybe not read yet)
            continue
        try:
            element = ds[tag]
            value = element.value
        except Exception:
            raise ReadError(path, f"broken DICOM header (invalid value in tag {tag})") from None
        if element.VR == "SQ":
            for item in value or ():
                _parse_dataset(path, item, depth + 1)


def header_free_reason(exc: BaseException, ds) -> str:
    """`short` (quoted values taken out) with every text value of the file's header taken out too: a
    decoder's message may quote a header value without quotes (e.g. a mistyped PhotometricInterpretation)."""
    return scrub(short(exc), ds)


def frame_count(ds) -> int:
    return max(_int_or(ds, "NumberOfFrames", 1), 1)


def _int_or(ds, keyword: str, default: int) -> int:
    """An integer header value, or `default` when absent or not a number (check_size reports that)."""
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError, OverflowError):
        return default


def classify(ds) -> tuple[str | None, str]:
    """('oct' | 'fundus' | None, description). None: a DICOM object retina does not read (with why)."""
    sop = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
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
    return iso_datetime(ds.get(f"{prefix}Date"), ds.get(f"{prefix}Time"))


def acquisition_datetime(ds) -> str | None:
    """``YYYY-MM-DDTHH:MM:SS`` from AcquisitionDateTime, else the first valid date (+ time) of the
    acquisition, content, series or study; never the header's text itself (sanitize.py)."""
    found = iso_dicom_datetime(ds.get("AcquisitionDateTime"))
    if found:
        return found
    for prefix in ("Acquisition", "Content", "Series", "Study"):
        found = _dicom_datetime(ds, prefix)
        if found:
            return found
    return None


def _first(sequence_owner, keyword: str):
    seq = sequence_owner.get(keyword) if sequence_owner is not None else None
    return seq[0] if seq else None


def _pixel_spacing_2d(ds) -> tuple[float, float] | None:
    candidates = [ds]
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    if shared is not None:
        candidates.insert(0, _first(shared, "PixelMeasuresSequence"))
    per_frame = _first(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame is not None:
        candidates.append(_first(per_frame, "PixelMeasuresSequence"))
    for owner in candidates:
        if owner is not None and owner.get("PixelSpacing"):
            try:
                row, col = (float(v) for v in owner.PixelSpacing[:2])
                return row, col
            except (TypeError, ValueError):
                continue
    return None


def _slice_spacing(ds) -> float | None:
    for owner in (ds, _first(_first(ds, "SharedFunctionalGroupsSequence"), "PixelMeasuresSequence")):
        if owner is None:
            continue
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            if owner.get(keyword) not in (None, ""):
                try:
                    return float(owner.get(keyword))
                except (TypeError, ValueError):
                    pass
    return None


def referenced_uids(ds) -> tuple[str, ...]:
    """Localizer links: ReferencedImageSequence and per-frame Ophthalmic Frame Location references."""
    found: list[str] = []

    def add(item) -> None:
        uid = item.get("ReferencedSOPInstanceUID") if item is not None else None
        if uid and str(uid) not in found:
            found.append(str(uid))

    for item in ds.get("ReferencedImageSequence") or []:
        add(item)
    for item in ds.get("OphthalmicFrameLocationSequence") or []:
        add(item)
    for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
        for item in frame.get("OphthalmicFrameLocationSequence") or []:
            add(item)
    return tuple(found)


def header_meta(ds) -> ImageMeta:
    modality, _ = classify(ds)
    laterality = normalise_laterality(ds.get("ImageLaterality")) or normalise_laterality(ds.get("Laterality"))
    if laterality is None:
        shared = _first(ds, "SharedFunctionalGroupsSequence")
        frame_anatomy = _first(shared, "FrameAnatomySequence")
        if frame_anatomy is not None:
            laterality = normalise_laterality(frame_anatomy.get("FrameLaterality"))
    device = device_name(ds.get("Manufacturer"), ds.get("ManufacturerModelName"))
    spacing2d = _pixel_spacing_2d(ds)
    spacing: tuple[float, ...] | None = spacing2d
    if modality == "oct" and spacing2d is not None:
        slice_spacing = _slice_spacing(ds)
        spacing = (slice_spacing if slice_spacing is not None else float("nan"), *spacing2d)
    return ImageMeta(
        laterality=laterality,
        study_date=iso_date(ds.get("StudyDate")),
        acquisition_datetime=acquisition_datetime(ds),
        device=device,
        pixel_spacing_mm=spacing,
        patient_id=str(ds.get("PatientID", "") or "") or None,
        patient_name=str(ds.get("PatientName", "") or "") or None,
        accession_number=str(ds.get("AccessionNumber", "") or "") or None,
        study_uid=str(ds.get("StudyInstanceUID", "") or "") or None,
        series_uid=str(ds.get("SeriesInstanceUID", "") or "") or None,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or "") or None,
        referenced_sop_uids=referenced_uids(ds),
        photometric=photometric(ds.get("PhotometricInterpretation")),
        extra={"sop_class": _sop_name(str(ds.get("SOPClassUID", "")))},
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


def load_pixels(path: Path, header=None) -> tuple[Any, np.ndarray]:
    """Full read with the guards: size cap first (header), then decode with one-line reasons.

    `header` from ``read_header(path, with_pixels=True)`` is decoded as it is; any other header
    (or none) means one full read here.
    """
    ds = header if header is not None else read_header(path, with_pixels=True)
    check_size(path, ds)
    stated = ds.get("PhotometricInterpretation")
    if stated not in (None, "") and photometric(stated) is None:  # its text is never quoted
        raise ReadError(path, "unsupported PhotometricInterpretation in header (not a DICOM defined term)")
    problem = _transfer_syntax_problem(ds)
    if problem:
        raise ReadError(path, problem)
    if not _holds_pixel_element(ds):  # a discovery header (stop_before_pixels): read the file
        ds = read_header(path, with_pixels=True)
    if not _holds_pixel_element(ds):
        raise ReadError(path, "no pixel data (truncated file or not an image)")
    _check_native_length(path, ds)
    _check_codestreams(path, ds)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        text = str(exc)
        if "less than expected" in text or "truncated" in text.lower() or isinstance(exc, EOFError):
            raise ReadError(path, "truncated pixel data") from None
        raise ReadError(path, f"cannot decode pixel data ({header_free_reason(exc, ds)})") from None
    try:
        return ds, _to_display_values(ds, pixels)
    except ReadError:
        raise
    except Exception as exc:  # e.g. PALETTE COLOR without its lookup tables
        reason = header_free_reason(exc, ds)
        raise ReadError(path, f"cannot convert pixel data to display values ({reason})") from None


def _holds_pixel_element(ds) -> bool:
    """Whether `ds` holds a pixel data element (a header read with stop_before_pixels does not)."""
    return any(tag in ds for tag in PIXEL_DATA_TAGS)


def _check_native_length(path: Path, ds) -> None:
    """Uncompressed pixel data longer than the header's frames x rows x columns: the header is wrong
    (e.g. NumberOfFrames too small), so which frames are meant is unknown. (Shorter data is caught by
    the decoder as truncated.)"""
    if ds.file_meta.get("TransferSyntaxUID") is None or ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    data = ds.get("PixelData")
    if not isinstance(data, bytes | bytearray):
        return
    try:
        bits = int(ds.get("BitsAllocated", 8) or 8)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        expected_bits = frame_count(ds) * int(ds.Rows) * int(ds.Columns) * samples * bits
    except (TypeError, ValueError, AttributeError):
        return  # the decoder reports a broken header itself
    expected = (expected_bits + 7) // 8
    actual = len(data)
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
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
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
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
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
        if pixels.dtype == np.uint16 and int(ds.get("BitsAllocated", 8)) == 8:
            pixels = (pixels >> 8).astype(np.uint8)
    if pixels.dtype.kind == "i" and pixels.size:
        if pixels.min() >= 0:  # signed storage of unsigned values
            pixels = pixels.astype(np.uint16 if pixels.max() > 255 else np.uint8)
        else:  # truly signed values: float32 keeps them (items hold uint8 / uint16 / float32)
            pixels = pixels.astype(np.float32)
    elif (pixels.dtype.kind == "f" and pixels.dtype != np.float32) or pixels.dtype == np.uint32:
        pixels = pixels.astype(np.float32)
    return pixels


def read_dicom(path: Path, source_format: str = "dicom") -> OctVolume | FundusImage:
    """One DICOM file: a multi-frame OCT volume (or a one-B-scan OPT) or a fundus image."""
    header = read_header(path, with_pixels=True)
    modality, description = classify(header)
    if modality is None:
        raise ReadError(path, f"not an OCT volume or fundus image: {description}")
    ds, pixels = load_pixels(path, header)
    meta = header_meta(ds)
    frames = frame_count(ds)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if modality == "oct":
        if samples > 1:  # RGB-rendered B-scans
            pixels = to_grayscale(pixels)
        if pixels.ndim == 2:
            pixels = pixels[None]
        return OctVolume(str(path), np.ascontiguousarray(pixels), source_format, meta)
    if frames > 1:
        pixels = pixels[0]
        meta.extra["frames"] = frames
        meta.extra["note"] = f"multi-frame photograph ({frames} frames): first frame used"
    return FundusImage(str(path), np.ascontiguousarray(as_fundus_array(path, pixels)), source_format, meta)


def _position(ds) -> np.ndarray | None:
    position = ds.get("ImagePositionPatient")
    if position is None:
        frame = _first(ds, "PerFrameFunctionalGroupsSequence")
        plane = _first(frame, "PlanePositionSequence")
        position = plane.get("ImagePositionPatient") if plane is not None else None
    if position is None or len(position) != 3:
        return None
    return np.array([float(v) for v in position])


def _positions_along_scan_axis(datasets: list) -> list[float] | None:
    """Project each B-scan's position on the slice normal (or, without orientation, on the axis
    along which the positions spread the most)."""
    positions = [_position(ds) for ds in datasets]
    if any(p is None for p in positions):
        return None
    stacked = np.stack(positions)
    orientation = datasets[0].get("ImageOrientationPatient")
    axis = None
    if orientation is not None and len(orientation) == 6:
        values = np.array([float(v) for v in orientation])
        normal = np.cross(values[:3], values[3:])
        if np.linalg.norm(normal) > 0:
            axis = normal / np.linalg.norm(normal)
    if axis is None:
        axis = np.eye(3)[int(np.argmax(np.ptp(stacked, axis=0)))]
    return [float(v) for v in stacked @ axis]


def _frame_location_y(ds) -> float | None:
    """Ophthalmic Frame Location: B-scan line on the localizer; its row coordinate orders the scans."""
    items = list(ds.get("OphthalmicFrameLocationSequence") or [])
    for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
        items.extend(frame.get("OphthalmicFrameLocationSequence") or [])
    for item in items:
        coords = item.get("ReferenceCoordinates")
        if coords is not None and len(coords) >= 2:
            return float(coords[0])
    return None


def series_order(members: list[tuple[Path, Any]]) -> list[Path]:
    """Order single-frame B-scan files: patient position, else frame location, else InstanceNumber,
    else natural file-name order. The first key that every file has and that separates them wins."""

    def instance_number(ds) -> float | None:
        try:
            return float(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
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


def read_dicom_series(path: Path, members: tuple[Path, ...]) -> OctVolume:
    """Single-frame B-scan files of one series (already ordered) -> one volume."""
    scans: list[np.ndarray] = []
    headers: list = []
    meta: ImageMeta | None = None
    for member in members:
        ds, pixels = load_pixels(member)
        headers.append(ds)
        if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
            pixels = to_grayscale(pixels)
        if pixels.ndim == 3:
            pixels = pixels[0]
        if scans and pixels.shape != scans[0].shape:
            raise ReadError(
                path, f"B-scan {member.name} has shape {pixels.shape}, the others {scans[0].shape}"
            )
        if meta is None:
            meta = header_meta(ds)
        else:
            for uid in referenced_uids(ds):
                if uid not in meta.referenced_sop_uids:
                    meta.referenced_sop_uids = (*meta.referenced_sop_uids, uid)
        scans.append(pixels)
        check_sample_budget(path, (len(members), *scans[0].shape))  # the whole series, before the rest
    if not scans or meta is None:
        raise ReadError(path, "empty B-scan series")
    meta.sop_instance_uid = None  # the volume is many instances
    meta.extra["files"] = len(members)
    positions = _positions_along_scan_axis(headers) if len(headers) > 1 else None
    spacing2d = _pixel_spacing_2d(headers[0])
    if positions is not None and spacing2d is not None:
        meta.pixel_spacing_mm = (float(np.median(np.abs(np.diff(positions)))), *spacing2d)
    return OctVolume(str(path), np.stack(scans), "dicom-series", meta)
