"""The bad-input corpus: every kind of broken, odd or hostile input a real export folder can hold,
generated on the fly (no committed binaries), each with the outcome retina promises for it.

`build_corpus(root)` writes the files under `root` and returns one `Case` per kind:

- outcome "read": readable; `modality`, `shape` (and `dtype`) are what the reader must return;
- outcome "error": reported as unreadable with a one-line reason starting with `reason`;
- outcome "ignored": not an image retina reads; counted and listed with `reason` (never an error);
- outcome "skipped": never reported at all (hidden files, FIFOs, symlink loops), and never hangs.

`embed_fails` marks items that read fine but cannot be embedded (NaN / Inf pixels: the preprocessing
refuses them), with the reason `retina embed` reports.

Files whose outcome depends on the environment are simulated the same way in every process that reads
the corpus (see `SIMULATION`): JPEG 2000 decoders are hidden (the "no decoder installed" case), and
`unreadable.*` files fail to open with EACCES. (Tests run as root in CI containers, where chmod 000 does
not stop reads, so the files are chmod 000 *and* the open is refused by the simulation.)
"""

from __future__ import annotations

import base64
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from test_readers_support import (
    OP8_SOP,
    _base,
    _set_pixels,
    ramp_volume,
    write_bscan_series,
    write_op,
    write_opt,
)

CT_SOP = "1.2.840.10008.5.1.4.1.1.2"

# Identifiers written into the corpus's DICOM headers (the PHI test greps for them).
PATIENT_ID = "SYN424242"
PATIENT_NAME = "SYNTH^P4242"

# Code run first in every process that reads the corpus (subprocess `-c` scripts and in-process tests).
SIMULATION = r"""
import builtins, errno, io, os
from pathlib import Path as _P

def _hide_jpeg2000_decoders():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000, JPEG2000Lossless
    for uid in (JPEG2000Lossless, JPEG2000):
        decoder = get_decoder(uid)
        for plugin in list(decoder.available_plugins):
            decoder.remove_plugin(plugin)

def _refuse(path):
    name = os.path.basename(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
    if name.startswith("unreadable."):
        raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

_open, _io_open, _os_open = builtins.open, io.open, os.open
def _guarded_open(file, *args, **kwargs):
    _refuse(file)
    return _open(file, *args, **kwargs)
def _guarded_os_open(path, *args, **kwargs):
    _refuse(path)
    return _os_open(path, *args, **kwargs)
builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
_hide_jpeg2000_decoders()
"""


# A 350-byte mutated TIFF from fuzz/run_fuzz.py: iterating its pages looped forever in tifffile 2026.3
# unless the page offsets are indexed first (retinacli.readers.images.index_pages).
LOOPING_TIFF_B64 = (
    "SUkqAAgAAAAPAAABBAABAAAACgAAAAEBBAABAAAADAAAAAIBAwADAAAAwgAAAAMBAwABAAAA6t1W3R9HxUBtE9LjWKWmer0B",
    "AAAABgEDAAEAAAACAAAADgECABcAAADIAAAAEQEEAAEAAAAQAQAAFQEDAAEAAAADAAAAFgEEAAEAAAAMAAAAFwEEAAEAAABo",
    "AQAAGgEFAAEAAADuAAAAGwEFAAEAAAD2AAAAHAEDAAEAAAABAAAAKAEDAAEAAAABAAAAMQECAAwAAAD+AAAAAAAAAAgACAAI",
    "AHsic2hhcGUiOiBbMTIsIDEwLCAzXX0AAAAAAAAAAAAAAAAAAAAAAQAAAAEAAAABAAAAAQAAAHRpZmZmaWxlLnB5AAAAAAAA",
    "AKSNu28v5mR45glf8zKNu28v5mR45glf8zKNu28v5mR45glf8zKNu28v5mR45glf8zKNu28v5mR45glf8zI=",
)


@dataclass
class Case:
    kind: str
    path: str  # relative to the corpus root: the source path retina reports
    outcome: str  # read | error | ignored | skipped
    modality: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    reason: str = ""
    embed_fails: str = ""  # reads, but `retina embed` reports it with this reason
    pixels: np.ndarray | None = None  # exact pixels the reader must return, where the encoding is odd


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return struct.pack(">I", len(data)) + kind + data + crc


def png_bomb_bytes(width: int = 200_000, height: int = 200_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _save_pil(path: Path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _dicom_bytes(write, *args, **kwargs) -> bytes:
    """Bytes of a DICOM written by one of the test_readers_support writers (via a temp file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.dcm"
        write(path, *args, **kwargs)
        return path.read_bytes()


def _op_dataset(pixels: np.ndarray, photometric: str) -> Dataset:
    ds = _base(OP8_SOP, "OP", PATIENT_ID, "OD", "20240102102900", None)
    ds.PatientName = PATIENT_NAME
    _set_pixels(ds, pixels, photometric)
    return ds


def build_corpus(root: Path) -> list[Case]:
    """Write every kind under `root` (plus good files mixed in); return the expected outcomes."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cases: list[Case] = []

    def add(kind, path, outcome, **kw):
        cases.append(Case(kind, str(path), outcome, **kw))

    # --- good files mixed in -------------------------------------------------------------------
    write_opt(root / "good_oct.dcm", ramp_volume(4, 32, 32), patient=PATIENT_ID)
    add("good DICOM OCT volume", "good_oct.dcm", "read", modality="oct", shape=(4, 32, 32), dtype="uint8")
    colour = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    write_op(root / "good_fundus.dcm", colour, patient=PATIENT_ID)
    add("good DICOM fundus", "good_fundus.dcm", "read", modality="fundus", shape=(40, 48, 3), dtype="uint8")
    _save_pil(root / "good_photo.png", Image.fromarray(colour))
    add("good PNG fundus", "good_photo.png", "read", modality="fundus", shape=(40, 48, 3), dtype="uint8")
    good_oct = (root / "good_oct.dcm").read_bytes()

    # --- DICOM -------------------------------------------------------------------------------------
    (root / "zero.dcm").write_bytes(b"")
    add("zero-byte file", "zero.dcm", "error", reason="empty file (0 bytes)")
    (root / "text.dcm").write_text("this is a text file renamed to .dcm\n" * 10)
    add("text renamed .dcm", "text.dcm", "error", reason="not a DICOM file")
    (root / "cut_pixels.dcm").write_bytes(good_oct[:-700])
    add("DICOM truncated mid-pixel-data", "cut_pixels.dcm", "error", reason="truncated pixel data")
    (root / "cut_header.dcm").write_bytes(good_oct[:300])
    add("DICOM truncated in the header", "cut_header.dcm", "error", reason="not a DICOM file")

    ds = pydicom.dcmread(root / "good_oct.dcm")
    del ds.PixelData
    ds.save_as(root / "no_pixels.dcm", enforce_file_format=True)
    add("DICOM without pixel data", "no_pixels.dcm", "error", reason="no pixel data")

    ct = _base(CT_SOP, "CT", PATIENT_ID, "OD", "20240102102900", None)
    _set_pixels(ct, rng.integers(0, 4000, (32, 32), dtype=np.uint16), "MONOCHROME2")
    ct.save_as(root / "ct_slice.dcm", enforce_file_format=True)
    add("wrong SOP class (CT image)", "ct_slice.dcm", "ignored",
        reason="unsupported DICOM image class (CT Image")

    ds = pydicom.dcmread(root / "good_oct.dcm")
    ds.NumberOfFrames = 7  # pixel data holds 4
    ds.save_as(root / "frames_more.dcm", enforce_file_format=True)
    add("OPT NumberOfFrames larger than the pixel data", "frames_more.dcm", "error",
        reason="truncated pixel data")
    ds = pydicom.dcmread(root / "good_oct.dcm")
    ds.NumberOfFrames = 2  # pixel data holds 4
    ds.save_as(root / "frames_fewer.dcm", enforce_file_format=True)
    add("OPT NumberOfFrames smaller than the pixel data", "frames_fewer.dcm", "error",
        reason="pixel data does not match the header")
    ds = pydicom.dcmread(root / "good_oct.dcm")
    ds.Rows = 0
    ds.save_as(root / "zero_rows.dcm", enforce_file_format=True)
    add("DICOM with Rows = 0", "zero_rows.dcm", "error", reason="invalid image size in header")
    ds = pydicom.dcmread(root / "good_oct.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000
    ds.save_as(root / "bomb.dcm", enforce_file_format=True)
    add("DICOM huge-dimension header (bomb)", "bomb.dcm", "error", reason="pixel data too large")

    write_opt(root / "j2k.dcm", ramp_volume(3, 32, 32), patient=PATIENT_ID, jpeg2000=True)
    add("JPEG 2000 OPT, decoder missing", "j2k.dcm", "error",
        reason="unsupported transfer syntax JPEG 2000 Image Compression (Lossless Only)")

    write_opt(root / "oct16.dcm", ramp_volume(3, 32, 32, dtype=np.uint16) * 300, patient=PATIENT_ID)
    add("16-bit OPT", "oct16.dcm", "read", modality="oct", shape=(3, 32, 32), dtype="uint16",
        pixels=ramp_volume(3, 32, 32, dtype=np.uint16) * 300)

    signed = (ramp_volume(3, 32, 32).astype(np.int16) - 40).astype(np.int16)
    ds = _base("1.2.840.10008.5.1.4.1.1.77.1.5.4", "OPT", PATIENT_ID, "OS", "20240102103000", None)
    ds.NumberOfFrames = 3
    _set_pixels(ds, signed, "MONOCHROME2")
    ds.PixelRepresentation = 1
    ds.save_as(root / "oct_signed.dcm", enforce_file_format=True)
    add("signed 16-bit OPT with negative values", "oct_signed.dcm", "read", modality="oct",
        shape=(3, 32, 32), dtype="float32", pixels=signed.astype(np.float32))

    gray = rng.integers(0, 255, (24, 20), dtype=np.uint8)
    ds = _op_dataset(gray, "MONOCHROME1")
    ds.save_as(root / "mono1.dcm", enforce_file_format=True)
    add("MONOCHROME1 photograph", "mono1.dcm", "read", modality="fundus", shape=(24, 20, 1), dtype="uint8",
        pixels=(255 - gray)[:, :, None])

    index = rng.integers(0, 4, (24, 20), dtype=np.uint8)
    ds = _op_dataset(index, "MONOCHROME2")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    lut = [np.array([0, 255, 0, 128], np.uint16) * 257, np.array([0, 0, 255, 128], np.uint16) * 257,
           np.array([0, 0, 0, 255], np.uint16) * 257]
    for colour_name, values in zip(("Red", "Green", "Blue"), lut, strict=True):
        setattr(ds, f"{colour_name}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour_name}PaletteColorLookupTableData", values.astype("<u2").tobytes())
    ds.save_as(root / "palette.dcm", enforce_file_format=True)
    rgb_lut = np.stack([(channel // 257).astype(np.uint8) for channel in lut], axis=-1)
    add("palette colour photograph", "palette.dcm", "read", modality="fundus", shape=(24, 20, 3),
        dtype="uint8", pixels=rgb_lut[index])

    rgb = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
    ds = _op_dataset(rgb, "RGB")
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(np.moveaxis(rgb, -1, 0)).tobytes()
    ds.save_as(root / "planar1.dcm", enforce_file_format=True)
    add("planar configuration 1 RGB", "planar1.dcm", "read", modality="fundus", shape=(24, 20, 3),
        dtype="uint8", pixels=rgb)

    series = root / "series_odd"
    write_bscan_series(series, ramp_volume(4, 32, 32), patient=PATIENT_ID)
    odd = pydicom.dcmread(sorted(series.iterdir())[0])
    _set_pixels(odd, np.zeros((40, 32), np.uint8), "MONOCHROME2")
    odd.save_as(sorted(series.iterdir())[0], enforce_file_format=True)
    add("single-frame B-scan series with one odd-size frame", "series_odd", "error", reason="B-scan")

    (root / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 64)
    add("DICOMDIR index", "DICOMDIR", "ignored", reason="DICOMDIR index")
    write_opt(root / "IM000001", ramp_volume(4, 32, 32), patient=PATIENT_ID)
    add("extension-less DICOM (IM000001)", "IM000001", "read", modality="oct", shape=(4, 32, 32),
        dtype="uint8")

    # --- 2D images -------------------------------------------------------------------------------
    _save_pil(root / "one_pixel.png", Image.fromarray(np.array([[[10, 20, 30]]], np.uint8)))
    add("1x1 image", "one_pixel.png", "read", modality="fundus", shape=(1, 1, 3), dtype="uint8",
        pixels=np.array([[[10, 20, 30]]], np.uint8))
    (root / "bomb.png").write_bytes(png_bomb_bytes())
    add("PNG huge-dimension header (bomb)", "bomb.png", "error", reason="image too large")
    png = (root / "good_photo.png").read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    add("truncated PNG", "cut.png", "error", reason="image truncated")
    _save_pil(root / "photo.jpg", Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    jpg = (root / "photo.jpg").read_bytes()
    (root / "photo.jpg").unlink()
    (root / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    add("truncated JPEG", "cut.jpg", "error", reason="image truncated")
    import tifffile

    tifffile.imwrite(root / "whole.tif", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tif = (root / "whole.tif").read_bytes()
    (root / "whole.tif").unlink()
    (root / "cut.tif").write_bytes(tif[: len(tif) // 2])
    add("truncated TIFF", "cut.tif", "error", reason="cannot decode TIFF")
    frames = [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated GIF", "animated.gif", "ignored", reason="not an image (.gif file)")
    _save_pil(root / "nir16.png", Image.fromarray((rng.integers(0, 65535, (20, 24))).astype(np.uint16)))
    add("16-bit grayscale PNG", "nir16.png", "read", modality="fundus", shape=(20, 24, 1), dtype="uint16")
    _save_pil(root / "rgba.png", Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8)))
    add("RGBA PNG", "rgba.png", "read", modality="fundus", shape=(20, 24, 3), dtype="uint8")
    _save_pil(root / "cmyk.jpg", Image.fromarray(colour).convert("CMYK"))
    add("CMYK JPEG", "cmyk.jpg", "read", modality="fundus", shape=(40, 48, 3), dtype="uint8")
    _save_pil(root / "palette.png", Image.fromarray(colour).convert("P"))
    add("palette PNG", "palette.png", "read", modality="fundus", shape=(40, 48, 3), dtype="uint8")
    (root / "text.png").write_text("not a png\n")
    add("text renamed .png", "text.png", "error", reason="not a readable image (unknown format")

    bscans = root / "bscans_odd"
    bscans.mkdir()
    for i in range(5):
        _save_pil(bscans / f"bscan_{i}.png", Image.fromarray(np.full((32, 24), 20 * i, np.uint8)))
    _save_pil(bscans / "bscan_5.png", Image.fromarray(np.full((30, 24), 99, np.uint8)))
    add("B-scan folder with one odd-size slice", "bscans_odd", "error", reason="B-scans differ in size")

    pages = root / "pages_differ.tif"
    with tifffile.TiffWriter(pages) as tw:
        tw.write(np.zeros((16, 16), np.uint8))
        tw.write(np.zeros((20, 16), np.uint8))
    add("multi-page TIFF whose pages differ in size", "pages_differ.tif", "error", reason="TIFF pages differ")

    (root / "looping_pages.tif").write_bytes(base64.b64decode("".join(LOOPING_TIFF_B64)))
    add("TIFF whose broken page chain made tifffile loop forever (found by fuzzing)", "looping_pages.tif",
        "error", reason="TIFF pages differ in size")

    # --- .npy / .vol -------------------------------------------------------------------------------
    nan_volume = np.full((4, 16, 16), 0.5, np.float32)
    nan_volume[1, 3, 3] = np.nan
    np.save(root / "nan_oct.npy", nan_volume)
    add("NaN in a float volume (.npy)", "nan_oct.npy", "read", modality="oct", shape=(4, 16, 16),
        dtype="float32", embed_fails="preprocessing failed (OCT volume contains NaN or infinite values)")
    inf_image = np.full((16, 16, 3), 0.5, np.float32)
    inf_image[2, 2, 0] = np.inf
    np.save(root / "inf_fundus.npy", inf_image)
    add("Inf in a float image (.npy)", "inf_fundus.npy", "read", modality="fundus", shape=(16, 16, 3),
        dtype="float32", embed_fails="preprocessing failed (fundus image contains NaN or infinite values)")
    np.save(root / "constant.npy", np.full((4, 16, 16), 7, np.uint8))
    add("constant volume (.npy)", "constant.npy", "read", modality="oct", shape=(4, 16, 16), dtype="uint8")
    np.save(root / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    add("object (pickle) array (.npy)", "objects.npy", "error", reason=".npy holds Python objects")
    np.save(root / "five_d.npy", np.zeros((2, 2, 2, 2, 2), np.uint8))
    add("5-D array (.npy)", "five_d.npy", "error", reason="array shape (2, 2, 2, 2, 2) is neither")
    np.save(root / "empty_oct.npy", np.zeros((0, 16, 16), np.uint8))
    add("volume with zero B-scans (.npy)", "empty_oct.npy", "error", reason="empty array")
    np.save(root / "whole.npy", np.zeros((4, 32, 32), np.uint8))
    npy = (root / "whole.npy").read_bytes()
    (root / "whole.npy").unlink()
    (root / "cut.npy").write_bytes(npy[:-1000])
    add("truncated .npy", "cut.npy", "error", reason="truncated or unreadable .npy")
    np.save(root / "complex.npy", np.zeros((8, 8), np.complex64))
    add("complex dtype (.npy)", "complex.npy", "error", reason="unsupported array dtype complex64")
    (root / "cut.vol").write_bytes(b"HSF-OCT-103\x00" + b"\x00" * 200)
    add("truncated Heidelberg .vol header", "cut.vol", "error", reason="invalid .vol header")

    # --- file system -----------------------------------------------------------------------------
    (root / "unreadable.png").write_bytes(png)
    os.chmod(root / "unreadable.png", 0)
    add("unreadable file (permissions)", "unreadable.png", "error", reason="cannot open (permission denied)")
    (root / "loop").symlink_to(root, target_is_directory=True)
    add("symlink loop (folder)", "loop", "skipped")
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    add("symlink loop (file)", "loop_a.png", "error", reason="symbolic link loop")
    add("symlink loop (file, other end)", "loop_b.png", "error", reason="symbolic link loop")
    os.symlink("gone.png", root / "dangling.png")
    add("broken symlink", "dangling.png", "error", reason="broken symbolic link")
    odd_name = os.fsdecode(b"fundus_\xff\xfe.png")
    (root / odd_name).write_bytes(png)
    add("non-UTF-8 file name", odd_name, "read", modality="fundus", shape=(40, 48, 3), dtype="uint8")
    (root / "folder.dcm").mkdir()
    _save_pil(root / "folder.dcm" / "inside.png", Image.fromarray(colour))
    add("folder named like an image (holding one)", "folder.dcm/inside.png", "read", modality="fundus",
        shape=(40, 48, 3), dtype="uint8")
    (root / "empty_folder.png").mkdir()
    add("empty folder named like an image", "empty_folder.png", "skipped")
    (root / ".hidden.png").write_bytes(b"junk")
    add("hidden file", ".hidden.png", "skipped")
    os.mkfifo(root / "pipe.png")
    add("FIFO named like an image (never opened)", "pipe.png", "skipped")
    (root / "notes.txt").write_text(f"patient {PATIENT_ID}\n")
    add("text file", "notes.txt", "ignored", reason="not an image (.txt file)")
    return cases


OCT_AS_FUNDUS_REASON = "is an OCT volume, not a fundus image"
