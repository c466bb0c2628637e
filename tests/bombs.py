"""Small files that declare gigabytes of pixels (decompression bombs), built in milliseconds.

Used by tests/test_limits_decode.py and benchmarks/bomb_rss.py. Each file is valid up to the size
fields: the DICOM's JPEG 2000 codestream (SIZ marker), the TIFF's ImageWidth/ImageLength tags, the
PNG's IHDR and the .npy header declare the huge size, while the DICOM header (Rows/Columns) stays small.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import tifffile

SOC_SIZ = b"\xff\x4f\xff\x51"  # JPEG 2000 start of codestream, then the SIZ marker


def patch_siz(codestream: bytes, width: int, height: int) -> bytes:
    """Every SIZ marker in `codestream` rewritten to declare width x height (one tile of that size)."""
    data = bytearray(codestream)
    at = data.find(SOC_SIZ)
    while at >= 0:
        siz = at + 4 + 4  # after the marker, Lsiz (2) and Rsiz (2)
        for offset, value in ((0, width), (4, height), (16, width), (20, height)):  # X/Ysiz, XT/YTsiz
            data[siz + offset : siz + offset + 4] = value.to_bytes(4, "big")
        at = data.find(SOC_SIZ, at + 4)
    return bytes(data)


def j2k_dicom(path: Path, width: int = 60_000, height: int = 60_000) -> Path:
    """A JPEG 2000 OPT (2 frames of 64x64 in its header) whose codestreams declare width x height."""
    from test_readers_support import ramp_volume, write_opt

    write_opt(path, ramp_volume(2, 64, 64), jpeg2000=True)
    ds = pydicom.dcmread(path)
    ds.PixelData = patch_siz(ds.PixelData, width, height)
    ds.save_as(path, enforce_file_format=True)
    return path


def deflated_dicom(path: Path, megabytes: int = 400) -> Path:
    """A Deflated Explicit VR DICOM (header: 2 frames of 64x64) whose data set ends with a private OB
    element of `megabytes` MB of zeros: about 0.4 MB on disk, inflated whole when pydicom opens it."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from test_readers_support import ramp_volume, write_opt

    ds = write_opt(path, ramp_volume(2, 64, 64))
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    size = megabytes << 20
    element = struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, size)  # after PixelData (7FE0,0010)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(body.getvalue() + element)]
    zeros = bytes(1 << 20)
    parts += [deflater.compress(zeros) for _ in range(megabytes)]
    parts.append(deflater.flush())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + b"".join(parts))
    return path


def tiff_bomb(path: Path, pages: int = 200, side: int = 4096) -> Path:
    """A deflate TIFF of `pages` side x side uint8 pages of zeros that all point at one shared compressed
    strip: about 40 KB on disk, 3.4 GB decoded (tifffile would decompress every page for real)."""
    strip = zlib.compress(bytes(side * side), 9)
    header = struct.pack("<2sHI", b"II", 42, 8 + len(strip))  # first IFD right after the strip
    entries = [  # (tag, type, value): 3 = SHORT, 4 = LONG
        (256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1),
        (273, 4, 8), (277, 3, 1), (278, 4, side), (279, 4, len(strip)),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    first = 8 + len(strip)
    ifds = []
    for index in range(pages):
        following = first + (index + 1) * ifd_size if index + 1 < pages else 0
        body = struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            field = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            body += struct.pack("<HHI", tag, kind, 1) + field
        ifds.append(body + struct.pack("<I", following))
    path.write_bytes(header + strip + b"".join(ifds))
    return path


def tiff_patched(path: Path, width: int = 60_000, height: int = 60_000) -> Path:
    """A one-strip deflate TIFF of 64x64 zeros whose tags were rewritten to declare width x height."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="zlib", rowsperstrip=64)
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        places = [(tags[code].valueoffset, tags[code].dtype) for code in (256, 257, 278)]
    data = bytearray(path.read_bytes())
    for (offset, kind), value in zip(places, (width, height, height), strict=True):
        fmt = "<H" if kind == 3 else "<I"  # SHORT or LONG
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return struct.pack(">I", len(data)) + kind + data + crc


def png_bomb(path: Path, width: int = 60_000, height: int = 60_000) -> Path:
    """A tiny PNG whose IHDR declares width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks + _png_chunk(b"IEND", b""))
    return path


def npy_bomb(path: Path, shape: tuple[int, ...] = (4096, 4096, 4096)) -> Path:
    """A .npy header declaring `shape` (uint8) with no data after it."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "|u1", "fortran_order": False, "shape": shape}
        )
    return path


def npy_truncated(path: Path, shape: tuple[int, ...] = (100, 1024, 1024)) -> Path:
    """A .npy whose header declares `shape` (within the default budget) but holds 1 KB of data."""
    npy_bomb(path, shape)
    with open(path, "ab") as handle:
        handle.write(b"\x00" * 1024)
    return path


def build_bombs(folder: Path) -> list[Path]:
    """One of each bomb in `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        j2k_dicom(folder / "j2k_bomb.dcm"),
        deflated_dicom(folder / "deflated_bomb.dcm"),
        tiff_bomb(folder / "tiff_bomb.tif"),
        tiff_patched(folder / "tiff_patched.tif"),
        png_bomb(folder / "png_bomb.png"),
        npy_bomb(folder / "npy_bomb.npy"),
        npy_truncated(folder / "npy_truncated.npy"),
    ]
