"""Pieces every reader shares: the Source record discovery hands to the readers, size guards, helpers."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import ReadError
from retinacli.items import ImageMeta

# re-exported for the readers: header text -> OD / OS lives with the other sanitising
from retinacli.readers.sanitize import normalise_laterality as normalise_laterality

# Per-item decoded-size budget (`--max-pixels`, env RETINA_MAX_PIXELS): at most this many samples
# (voxels or pixels x channels, i.e. frames x rows x columns x samples per pixel) in one item, checked
# from what the header, the codestream or the TIFF page declares before any pixel buffer is allocated.
# 2**27 = 134,217,728 admits the largest real acquisitions (a 128 x 1024 x 512 OCT cube is 67 M, a
# 4000 x 4000 RGB photo 48 M) and keeps one item's pixels near 0.5 GB even as float32.
DEFAULT_MAX_PIXELS = 1 << 27
MAX_PIXELS_ENV = "RETINA_MAX_PIXELS"
_max_pixels: int | None = None  # set by `--max-pixels` (set_max_pixels); None: env, else default

# A B-scan stack from several single-frame files is assembled under a virtual path
# "<folder>/series=<SeriesInstanceUID>" when the folder holds more than one such series.
SERIES_PREFIX = "series="

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pnm"}
TIFF_SUFFIXES = {".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}
NPY_SUFFIXES = {".npy"}
VOL_SUFFIXES = {".vol"}

# Vendor OCT formats retina does not read (no sample a test could build or ship): discovery names the
# format and the converter, never "not an image". Signatures as the reference readers check them:
# E2E "CMDb" at 0 then "MDbMDir" at 0x24 (LibE2E; eyepy's e2e_format has the same 36-byte version
# block), HEYEX's .sdb/.pdb/.edb databases are the same container; Topcon FDA/FDS "FOCT" at 0
# (OCT-Converter's fda/fds header). A Zeiss Cirrus cube .img is raw voxels without a header: known by
# its export name (..._cube_raw.img, ..._cube_z.img) or by the size of a 512x128 / 200x200 cube.
E2E_MAGIC = b"CMDb"
TOPCON_MAGIC = b"FOCT"
HEYEX_DB_SUFFIXES = {".sdb", ".pdb", ".edb"}
ZEISS_CUBE_NAME = re.compile(r"_cube_(raw|z)\.img$", re.IGNORECASE)
ZEISS_CUBE_BYTES = {1024 * 512 * 128, 1024 * 200 * 200}
_E2E_ADVICE = (
    "export the scan from HEYEX as DICOM or HEYEX XML, or convert it with eyepy "
    "(pip install 'retina[vendor]': eyepy.import_heyex_e2e) or OCT-Converter"
)
_TOPCON_ADVICE = "export the scan as DICOM, or convert it with OCT-Converter (pip install oct-converter: "
VENDOR_FORMATS = {  # suffix -> (format, what to do)
    ".e2e": ("Heidelberg E2E file", _E2E_ADVICE),
    ".fda": (
        "Topcon FDA file",
        _TOPCON_ADVICE
        + "oct_converter.readers.FDA) or eyepy (pip install 'eyepy[fda]': eyepy.import_topcon_fda)",
    ),
    ".fds": ("Topcon FDS file", _TOPCON_ADVICE + "oct_converter.readers.FDS)"),
}
_HEYEX_DB = (
    "Heidelberg HEYEX database file (E2E container)",
    "export the scans from HEYEX as DICOM or HEYEX XML",
)
_TOPCON_ANY = ("Topcon FDA/FDS file", _TOPCON_ADVICE + "oct_converter.readers.FDA / FDS)")
_ZEISS_CUBE = (
    "Zeiss Cirrus IMG cube (raw voxels, no header)",
    "export the scan as DICOM from Cirrus / FORUM, or convert it with OCT-Converter "
    "(pip install oct-converter: oct_converter.readers.IMG)",
)


@dataclass
class Source:
    """One thing discovery found that reads into one or more items.

    `kind` picks the reader: "dicom" (one file), "dicom-series" (single-frame B-scan files of one
    series), "image" (one 2D image file), "bscan-folder" (numbered B-scan images), "tiff", "npy",
    "vol", "heyex-xml" (one OCT series of a HEYEX XML export; `members` holds the XML). `modalities` is
    what reading it yields ("oct", "fundus" or both for a Heidelberg .vol or HEYEX export).
    `metas` holds the header metadata per modality, read without loading pixels (used for pairing).
    `header` holds what discovery parsed for the reader to decode from, so no file's header is parsed
    twice: the pydicom dataset of a "dicom" source (pixel data deferred: still on disk), a tuple of
    the members' datasets for a "dicom-series"; None: the reader parses the file itself.
    """

    path: Path
    kind: str
    modalities: tuple[str, ...]
    members: tuple[Path, ...] = ()
    metas: dict[str, ImageMeta] = field(default_factory=dict)
    format: str = ""
    header: Any = field(default=None, repr=False, compare=False)

    def meta(self, modality: str) -> ImageMeta:
        return self.metas.get(modality) or ImageMeta()


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders "bscan_2" before "bscan_10" (numbers compare as numbers)."""
    parts = _DIGITS.split(name)
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.lower()) for part in parts)


def numbered_pattern(name: str) -> str:
    """The file name with every run of digits replaced by '#': B-scan files share one pattern."""
    return _DIGITS.sub("#", name.lower())


def parse_max_pixels(text: str | int) -> int:
    """'134217728', '1.2e8' or '2**27' -> a positive whole number of samples; ValueError otherwise."""
    value = str(text).strip().replace("_", "")
    if "**" in value:
        base, _, power = value.partition("**")
        number = float(int(base)) ** int(power)
    else:
        number = float(value)
    if not number >= 1 or number != number or number > 1 << 62:
        raise ValueError("must be a positive number of samples")
    return int(number)


def set_max_pixels(limit: int | None) -> None:
    """Set the per-item budget for this process (None: back to $RETINA_MAX_PIXELS, else the default)."""
    global _max_pixels
    _max_pixels = None if limit is None else int(limit)


def max_pixels() -> int:
    """The per-item budget in samples: `--max-pixels`, else $RETINA_MAX_PIXELS, else 2**27."""
    if _max_pixels is not None:
        return _max_pixels
    env = os.environ.get(MAX_PIXELS_ENV)
    if env:
        try:
            return parse_max_pixels(env)
        except ValueError:
            pass  # the CLI reports a bad value as a usage error; the library keeps the default
    return DEFAULT_MAX_PIXELS


def sci(value: float) -> str:
    """134217728 -> '1.34e8' (short, and clearly a count, not a header value)."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def check_sample_budget(
    path: object, shape: tuple[int, ...], what: str = "pixel data", itemsize: int | None = None
) -> None:
    """ReadError when an item of `shape` (declared, not decoded) holds more samples than the budget.

    The reason gives the decoded size in samples (and bytes when `itemsize` is known), never the header
    values themselves."""
    total = 1
    for size in shape:
        total *= max(int(size), 0)
    limit = max_pixels()
    if total > limit:
        size = f"{sci(total)} samples"
        if itemsize:
            size += f" ({total * itemsize / 1e9:.1f} GB)"
        raise ReadError(path, f"{what} too large: decoded size {size} exceeds --max-pixels {sci(limit)}")


def vendor_format_reason(path: Path) -> str | None:
    """Why `path` is a vendor OCT file retina does not read (format, then what to do), or None.

    Known by suffix (.e2e, .fda, .fds, a Cirrus cube .img) or by signature under any other name; a file
    named like a vendor format but without its signature is still named, with that said."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES | TIFF_SUFFIXES | DICOM_SUFFIXES | NPY_SUFFIXES | VOL_SUFFIXES:
        return None
    if suffix == ".img":
        if ZEISS_CUBE_NAME.search(path.name) or path.stat().st_size in ZEISS_CUBE_BYTES:
            return "{}: retina does not read this format; {}".format(*_ZEISS_CUBE)
        return None
    with open(path, "rb") as handle:
        head = handle.read(4)
    found = None
    if head == E2E_MAGIC:
        found = _HEYEX_DB if suffix in HEYEX_DB_SUFFIXES else VENDOR_FORMATS[".e2e"]
    elif head == TOPCON_MAGIC:
        found = VENDOR_FORMATS[suffix] if suffix in (".fda", ".fds") else _TOPCON_ANY
    if found is not None:
        return f"{found[0]}: retina does not read this format; {found[1]}"
    if suffix in VENDOR_FORMATS:
        name, advice = VENDOR_FORMATS[suffix]
        name += " (by its name; it lacks the format's signature)"
        return f"{name}: retina does not read this format; {advice}"
    return None


def to_grayscale(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) luminance in the input's dtype family; used for RGB-rendered B-scans."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gray = pixels[..., :3].astype(np.float32) @ weights
    if np.issubdtype(pixels.dtype, np.integer):
        info = np.iinfo(pixels.dtype)
        return np.clip(np.rint(gray), info.min, info.max).astype(pixels.dtype)
    return gray


def as_fundus_array(path: object, pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, 1) or (H, W, 3); alpha dropped."""
    if pixels.ndim == 2:
        return pixels[:, :, None]
    if pixels.ndim == 3 and pixels.shape[2] in (1, 3):
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        return pixels[:, :, :3]
    if pixels.ndim == 3 and pixels.shape[2] == 2:  # gray + alpha
        return pixels[:, :, :1]
    raise ReadError(path, f"unexpected fundus image shape {tuple(pixels.shape)}")


def open_failure(path: Path, exc: OSError) -> ReadError:
    """The one line for a file that cannot be opened: a file retina may not read is reported as such,
    not as a broken image."""
    if isinstance(exc, PermissionError):
        return ReadError(path, "cannot open (permission denied)")
    if exc.errno == errno.ELOOP:
        return ReadError(path, "symbolic link loop")
    return ReadError(path, f"cannot open ({short(exc)})")


_QUOTED = re.compile(r"b?'[^']*'|b?\"[^\"]*\"")


def short(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception message, trimmed, with quoted values taken out: reasons stay one short
    line, and a parser's message may quote bytes or text from the file (a header value, a patient's
    name). An OSError gives its strerror only (the path is already the report's first field)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _QUOTED.sub("'…'", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def normalise_pixels(path: object, pixels: np.ndarray) -> np.ndarray:
    """Every item leaves the readers as uint8, uint16 or float32 with no empty axis.

    bool -> 0/255 uint8; other integers -> the smallest of uint8 / uint16 that holds their values,
    else float32 (negative values included); float16/64 -> float32.
    """
    if pixels.size == 0 or min(pixels.shape) == 0:
        raise ReadError(path, f"empty image (shape {tuple(int(s) for s in pixels.shape)})")
    dtype = pixels.dtype
    if dtype in (np.uint8, np.uint16, np.float32):
        return pixels
    if dtype == np.bool_:
        return pixels.astype(np.uint8) * np.uint8(255)
    if dtype.kind in "iu":
        low, high = int(pixels.min()), int(pixels.max())
        if low >= 0 and high <= 0xFF:
            return pixels.astype(np.uint8)
        if low >= 0 and high <= 0xFFFF:
            return pixels.astype(np.uint16)
        return pixels.astype(np.float32)
    if dtype.kind == "f":
        return pixels.astype(np.float32)
    raise ReadError(path, f"unsupported pixel type {dtype}")


def header_int(path: object, ds, keyword: str, default: int) -> int:
    """An integer header value (Rows, Columns, SamplesPerPixel, ...) or a ReadError naming it.

    The reason names the keyword and the expected kind only, never the value: a mistyped element
    (Rows stored as text) can hold anything, a patient's name included."""
    value = ds.get(keyword, default)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ReadError(path, f"invalid {keyword} in header (not a whole number)") from None
