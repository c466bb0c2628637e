"""2D images through Pillow (PNG, JPEG, BMP, PPM/PGM) and TIFF through tifffile.

A single image file is a fundus photo (colour) or a NIR/SLO image (grayscale). Several numbered
grayscale images of one size in one folder are the B-scans of an OCT volume (see volumes.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinacli.errors import ReadError
from retinacli.items import FundusImage, ImageMeta
from retinacli.readers.common import as_fundus_array, check_sample_budget, short

GRAY_MODES = {"1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F", "LA", "P"}


@dataclass
class ImageHeader:
    """What a header says without decoding pixels."""

    format: str  # "png", "jpeg", "tiff", ...
    width: int
    height: int
    grayscale: bool
    pages: int = 1  # TIFF pages (multi-page TIFF = OCT volume)
    page_shape: tuple[int, ...] = ()


def _pillow():
    from PIL import Image

    return Image


def image_header(path: Path) -> ImageHeader:
    """Open lazily (Pillow reads the header only); errors become one-line reasons."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ReadError(path, "empty file (0 bytes)")
    if path.suffix.lower() in {".tif", ".tiff"}:
        return tiff_header(path)
    Image = _pillow()
    try:
        with Image.open(path) as im:
            _check_pixels(path, im.width, im.height)
            mode = im.mode
            if mode == "P":  # a palette image is grayscale only if its palette is
                mode = "P-gray" if _palette_is_gray(im) else "P-colour"
            return ImageHeader(
                format=(im.format or path.suffix.lstrip(".")).lower(),
                width=im.width,
                height=im.height,
                grayscale=mode in GRAY_MODES or mode == "P-gray",
            )
    except ReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ReadError(path, f"image too large (decompression-bomb guard: {_bomb_text(exc)})") from None
    except Image.UnidentifiedImageError:
        raise ReadError(path, "not a readable image (unknown format or broken header)") from None
    except Exception as exc:
        raise ReadError(path, f"not a readable image ({short(exc)})") from None


def _bomb_text(exc: Exception) -> str:
    """Pillow's message without its 'could be decompression bomb DOS attack' tail."""
    return short(exc).split(", could be")[0].rstrip(".")


def _check_pixels(path: Path, width: int, height: int) -> None:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; retina refuses (no global
    warning filters, which are not thread-safe, are touched)."""
    limit = _pillow().MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ReadError(
            path, f"image too large (decompression-bomb guard: {width}x{height} pixels > {limit})"
        )


def _palette_is_gray(im) -> bool:
    palette = im.getpalette() or []
    triples = [palette[i : i + 3] for i in range(0, len(palette) - 2, 3)]
    return all(r == g == b for r, g, b in triples)


def quiet_tifffile():
    """tifffile, with its warnings about broken files kept off stderr (the ReadError reports them)."""
    import logging

    import tifffile

    logger = logging.getLogger("tifffile")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return tifffile


def index_pages(tif) -> int:
    """Number of pages. Called before anything iterates the pages: tifffile (2026.3) loops forever
    iterating a file whose IFD chain is circular unless the page offsets were indexed first."""
    return len(tif.pages)


def tiff_header(path: Path) -> ImageHeader:
    tifffile = quiet_tifffile()

    try:
        with tifffile.TiffFile(path) as tif:
            pages = index_pages(tif)  # first, before tif.series
            series = tif.series[0]
            shape = tuple(int(s) for s in series.shape)
            page = tif.pages[0]
            samples = int(getattr(page, "samplesperpixel", 1))
            height, width = int(page.imagelength), int(page.imagewidth)
    except ReadError:
        raise
    except Exception as exc:
        raise ReadError(path, f"not a readable TIFF ({short(exc)})") from None
    if len(shape) == 3 and shape[-1] not in (3, 4) and pages == 1:
        pages = shape[0]  # one page holding a stack (ImageJ / OME planar)
    return ImageHeader("tiff", width, height, samples == 1, pages=pages, page_shape=shape)


def _to_array(path: Path, im) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        im = im.convert("L" if _palette_is_gray(im) else "RGB")
    elif mode in {"1", "LA"}:
        im = im.convert("L")
    elif mode in {"RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "PA"}:
        im = im.convert("RGB")
    elif mode.startswith("I;16"):
        return np.asarray(im, dtype=np.uint16)
    pixels = np.asarray(im)
    if pixels.dtype == np.int32:  # mode "I": keep 16-bit data 16-bit
        fits_16_bit = pixels.min() >= 0 and pixels.max() < 65536
        pixels = pixels.astype(np.uint16 if fits_16_bit else np.float32)
    return pixels


def load_image(path: Path) -> tuple[np.ndarray, str]:
    """Decode one 2D image -> ((H, W) or (H, W, 3), format)."""
    path = Path(path)
    if path.suffix.lower() in {".tif", ".tiff"}:
        return load_tiff_page(path), "tiff"
    Image = _pillow()
    header = image_header(path)
    try:
        with Image.open(path) as im:
            _check_pixels(path, im.width, im.height)
            im.load()
            pixels = _to_array(path, im)
    except ReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ReadError(path, f"image too large (decompression-bomb guard: {_bomb_text(exc)})") from None
    except OSError as exc:
        if "truncated" in str(exc).lower() or "broken" in str(exc).lower():
            raise ReadError(path, "image truncated (file ends before the image data does)") from None
        raise ReadError(path, f"cannot decode image ({short(exc)})") from None
    except Exception as exc:
        raise ReadError(path, f"cannot decode image ({short(exc)})") from None
    return pixels, header.format


def load_tiff_page(path: Path) -> np.ndarray:
    tifffile = quiet_tifffile()

    header = tiff_header(path)
    check_sample_budget(path, header.page_shape)
    try:
        with tifffile.TiffFile(path) as tif:
            index_pages(tif)
            pixels = tif.pages[0].asarray()
    except Exception as exc:
        raise ReadError(path, f"cannot decode TIFF ({short(exc)})") from None
    if pixels.ndim == 3 and pixels.shape[0] in (3, 4) and pixels.shape[-1] not in (3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # planar RGB
    return pixels


def read_fundus_image(path: Path) -> FundusImage:
    pixels, fmt = load_image(path)
    return FundusImage(str(path), np.ascontiguousarray(as_fundus_array(path, pixels)), fmt, ImageMeta())
