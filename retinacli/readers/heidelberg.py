"""Heidelberg Spectralis raw export (.vol, "HSF-OCT-1xx"): the B-scan(s) as an OCT item and the IR-SLO
localizer as a grayscale fundus item.

Discovery parses the fixed 2048-byte file header itself (metadata, sizes, truncation check), so it
needs no optional package. Pixels are read with eyepy's low-level `HeVolReader` (the `vendor` extra),
which, unlike `eyepy.import_heyex_vol`, also parses circle scans (scan pattern 2).
"""

from __future__ import annotations

import datetime as dt
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinacli.errors import ReadError
from retinacli.items import FundusImage, ImageMeta, OctVolume
from retinacli.readers.common import check_sample_budget, normalise_laterality, short
from retinacli.readers.sanitize import iso_date, iso_datetime, scrub_texts, text_and_tokens

MAGIC = b"HSF-OCT-"
HEADER_SIZE = 2048
DEVICE = "Heidelberg Engineering Spectralis"
SCAN_PATTERNS = {0: "unknown", 1: "line", 2: "circle", 3: "volume (ART)", 4: "fast volume", 5: "radial"}
# Layout of the file header up to the visit date (little-endian, packed); see eyepy's vol_reader.
_VERSION = re.compile(r"^HSF-OCT-\d{1,4}$")
_HEADER = struct.Struct("<12s3I3d2I2dId4sQiI16s16sI24sdI24sd")


@dataclass
class VolHeader:
    version: str
    size_x: int
    n_bscans: int
    size_y: int
    scale_x: float
    distance: float
    scale_y: float
    size_x_slo: int
    size_y_slo: int
    scale_x_slo: float
    scale_y_slo: float
    laterality: str | None
    exam_time: dt.datetime | None
    scan_pattern: int
    bscan_hdr_size: int
    patient_id: str | None
    visit_date: dt.datetime | None


def _text(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("ascii", "replace").strip()


def _from_filetime(value: int) -> dt.datetime | None:
    """100 ns ticks since 1601-01-01 (Windows FILETIME)."""
    if value <= 0:
        return None
    try:
        return dt.datetime(1601, 1, 1) + dt.timedelta(microseconds=value // 10)
    except OverflowError:
        return None


def _from_ole_date(days: float) -> dt.datetime | None:
    """Days since 1899-12-30 (OLE automation date)."""
    if not days or not np.isfinite(days) or days < 1:
        return None
    try:
        return dt.datetime(1899, 12, 30) + dt.timedelta(days=days)
    except OverflowError:
        return None


def read_vol_header(path: Path) -> VolHeader:
    """Parse and sanity-check the header; a short or inconsistent file is an error with a reason."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ReadError(path, "empty file (0 bytes)")
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_SIZE)
    if not raw.startswith(MAGIC):
        raise ReadError(path, "not a Heidelberg .vol file (no HSF-OCT header)")
    if len(raw) < _HEADER.size:
        raise ReadError(path, f"truncated .vol file ({size} bytes)")
    fields = _HEADER.unpack_from(raw)
    (version, size_x, n_bscans, size_y, scale_x, distance, scale_y, size_x_slo, size_y_slo, scale_x_slo,
     scale_y_slo, _field_size, _focus, position, exam_time, pattern, bscan_hdr, _id, _ref_id, _pid,
     patient_id, _dob, _vid, _visit_id, visit_date) = fields  # fmt: skip
    header = VolHeader(
        version=_text(version),
        size_x=size_x,
        n_bscans=n_bscans,
        size_y=size_y,
        scale_x=scale_x,
        distance=distance,
        scale_y=scale_y,
        size_x_slo=size_x_slo,
        size_y_slo=size_y_slo,
        scale_x_slo=scale_x_slo,
        scale_y_slo=scale_y_slo,
        laterality=normalise_laterality(_text(position)),
        exam_time=_from_filetime(exam_time),
        scan_pattern=pattern,
        bscan_hdr_size=bscan_hdr,
        patient_id=_text(patient_id) or None,
        visit_date=_from_ole_date(visit_date),
    )
    if min(size_x, size_y, n_bscans, size_x_slo, size_y_slo) <= 0:
        raise ReadError(path, "invalid .vol header (zero image size)")
    check_sample_budget(path, (n_bscans, size_y, size_x), "B-scan data")
    expected = HEADER_SIZE + size_x_slo * size_y_slo + n_bscans * (bscan_hdr + size_x * size_y * 4)
    if size < expected:
        raise ReadError(path, f"truncated .vol file ({size} of {expected} bytes)")
    return header


def vol_metas(header: VolHeader) -> dict[str, ImageMeta]:
    """Header metadata for the OCT item and the SLO (fundus) item of one .vol file."""
    when = header.exam_time or header.visit_date
    common = {
        "laterality": header.laterality,
        "study_date": iso_date(header.visit_date or header.exam_time),
        "acquisition_datetime": iso_datetime(when) if when else None,
        "device": DEVICE,
        "patient_id": header.patient_id,
    }
    pattern = SCAN_PATTERNS.get(header.scan_pattern, str(int(header.scan_pattern)))
    version = header.version if _VERSION.match(header.version) else None  # header text: only its known form
    oct_meta = ImageMeta(
        pixel_spacing_mm=(float(header.distance), float(header.scale_y), float(header.scale_x)),
        photometric="MONOCHROME2",
        extra={"scan_pattern": pattern, "vol_version": version},
        **common,
    )
    slo_meta = ImageMeta(
        pixel_spacing_mm=(float(header.scale_y_slo), float(header.scale_x_slo)),
        photometric="MONOCHROME2",
        extra={"image_type": "IR-SLO localizer", "vol_version": version},
        **common,
    )
    return {"oct": oct_meta, "fundus": slo_meta}


def vol_intensity(raw: np.ndarray) -> np.ndarray:
    """Heyex display transform of raw reflectivity (float 0..1, float32-max = no data) -> uint8.

    Same log mapping eyepy uses (`eyepy.core.utils.from_vol_intensity`): without it the B-scan is
    nearly black, because reflectivity spans orders of magnitude.
    """
    data = np.asarray(raw, dtype=np.float32)
    valid = np.isfinite(data) & (data <= 1)
    out = np.zeros(data.shape, dtype=np.float32)
    out[valid] = (np.log(np.maximum(data[valid], 0) + 2.44e-04) + 8.3) / 8.285
    return np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)


def read_vol(path: Path) -> tuple[OctVolume, FundusImage]:
    """Both items of a .vol file: (OCT B-scans as uint8 after the intensity transform, IR-SLO)."""
    path = Path(path)
    header = read_vol_header(path)
    try:
        from eyepy.io.he.vol_reader import HeVolReader
    except ImportError:
        raise ReadError(
            path, "Heidelberg .vol needs the optional vendor reader: pip install 'retina[vendor]'"
        ) from None
    try:
        parsed = HeVolReader(path).parsed_file
        bscans = np.stack([np.asarray(b.data, dtype=np.float32) for b in parsed.bscans])
        slo = np.asarray(parsed.localizer, dtype=np.uint8)
    except Exception as exc:
        reason = scrub_texts(short(exc), text_and_tokens(header.patient_id))  # the parser may echo it
        raise ReadError(path, f"cannot parse .vol file ({reason})") from None
    metas = vol_metas(header)
    oct_item = OctVolume(str(path), vol_intensity(bscans), "heidelberg-vol", metas["oct"])
    slo_pixels = np.ascontiguousarray(slo[:, :, None])
    slo_item = FundusImage(str(path), slo_pixels, "heidelberg-vol", metas["fundus"])
    return oct_item, slo_item
