"""A small, fast DICOM Part 10 writer (explicit VR little endian) for the synthetic cohort.

pydicom's general writer spends most of a cohort's generation time on per-element bookkeeping;
the cohort only needs a fixed set of plain value types, so this encoder builds the bytes directly.
It uses pydicom's data dictionary for tags and VRs, and the files are read back with pydicom and
checked with dciodvfy in the tests.

    obj = DicomObject()
    obj.PatientName = "SYNTH^P0001"
    obj.ReferencedImageSequence = [item]        # a list of DicomObject
    write_part10(path, obj, sop_class_uid, sop_instance_uid)
"""

from __future__ import annotations

import struct
from functools import cache
from pathlib import Path

from pydicom.datadict import dictionary_VR, tag_for_keyword

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_LONG_HEADER_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_NUMBER_FORMATS = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<i", "FL": "<f", "FD": "<d"}
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0)[:4]


@cache
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise AttributeError(f"unknown DICOM keyword {keyword!r}")
    vr = dictionary_VR(tag)
    if " or " in vr:  # ambiguous VRs: the choices this writer needs
        vr = "OB" if tag == 0x7FE00010 else vr.split(" or ")[0]
    return tag, vr


class DicomObject:
    """Attribute-style collection of DICOM elements (keyword -> value), encoded by ``encode``."""

    __slots__ = ("_elements",)

    def __init__(self) -> None:
        object.__setattr__(self, "_elements", {})

    def __setattr__(self, keyword: str, value: object) -> None:
        tag, vr = _tag_and_vr(keyword)
        self._elements[tag] = (vr, value)

    def __getattr__(self, keyword: str) -> object:
        try:
            return self._elements[_tag_and_vr(keyword)[0]][1]
        except KeyError:
            raise AttributeError(keyword) from None

    def set_vr(self, keyword: str, vr: str, value: object) -> None:
        """Set an element whose VR depends on the data (e.g. PixelData OB vs OW)."""
        self._elements[_tag_and_vr(keyword)[0]] = (vr, value)

    def encode(self) -> bytes:
        return b"".join(_element(tag, vr, value) for tag, (vr, value) in sorted(self._elements.items()))


def _value_bytes(vr: str, value: object) -> bytes:
    if value is None:
        return b""
    if vr == "SQ":
        return b"".join(_ITEM + struct.pack("<I", len(body)) + body for body in (i.encode() for i in value))
    if vr in ("OB", "OW", "UN"):
        data = bytes(value)
        return data + b"\0" if len(data) % 2 else data
    if vr in _NUMBER_FORMATS:
        values = value if isinstance(value, (list, tuple)) else [value]
        return struct.pack("<" + _NUMBER_FORMATS[vr][1] * len(values), *values)
    if vr == "AT":
        tags = value if isinstance(value, (list, tuple)) else [value]
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in tags)
    values = value if isinstance(value, (list, tuple)) else [value]
    text = "\\".join(_text(vr, v) for v in values).encode("latin-1")
    if len(text) % 2:
        text += b"\0" if vr == "UI" else b" "
    return text


def _text(vr: str, value: object) -> str:
    if vr == "DS" and isinstance(value, float):
        text = f"{value:.10g}"
        return text if len(text) <= 16 else f"{value:.8g}"
    return str(value)


def _element(tag: int, vr: str, value: object) -> bytes:
    data = _value_bytes(vr, value)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in _LONG_HEADER_VRS:
        return head + struct.pack("<HI", 0, len(data)) + data
    if len(data) > 0xFFFF:
        raise ValueError(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) too long for VR {vr}")
    return head + struct.pack("<H", len(data)) + data


def write_part10(
    path: Path, dataset: DicomObject, sop_class: str, sop_instance: str, implementation: tuple[str, str]
) -> None:
    """Write preamble, File Meta Information (group 2) and ``dataset`` to ``path``."""
    meta = DicomObject()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    meta.ImplementationClassUID = implementation[0]
    meta.ImplementationVersionName = implementation[1]
    body = meta.encode()
    group_length = _element(0x00020000, "UL", len(body))
    Path(path).write_bytes(b"\0" * 128 + b"DICM" + group_length + body + dataset.encode())
