"""2D images through Pillow (PNG, JPEG, BMP, PPM/PGM) and TIFF through tifffile.

A single image file is a fundus photo (colour) or a NIR/SLO image (grayscale). Several numbered
grayscale images of one size in one folder are the B-scans of an OCT volume (see volumes.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinacli.errors import ReadError
from retinacli.items import FundusImage, ImageMeta
from retinacli.readers.common import as_fundus_array, check_sample_budget, sci, short

GRAY_MODES = {"1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F", "LA", "P"}


@dataclass
class ImageHeader:
    """What a header says without decoding pixels."""

    format: str  # "png", "jpeg", "tiff", ...
    width: int
    height: int
    grayscale: bool
    pages: int = 1  # full-resolution TIFF pages (multi-page TIFF = OCT volume)
    page_shape: tuple[int, ...] = ()  # TIFF: (pages, *one page's shape), or the one page's shape
    itemsize: int = 1  # bytes per sample (TIFF), for the size in the budget's reason


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
            _check_pixels(path, im)
            mode = im.mode
            if mode == "P":  # a palette image is grayscale only if its palette is
                mode = "P-gray" if _palette_is_gray(im) else "P-colour"
            width, height = im.width, im.height
            if _exif_orientation(im) in (5, 6, 7, 8):  # shown rotated a quarter turn
                width, height = height, width
            return ImageHeader(
                format=(im.format or path.suffix.lstrip(".")).lower(),
                width=width,
                height=height,
                grayscale=mode in GRAY_MODES or mode == "P-gray",
            )
    except ReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ReadError(path, _bomb_text(exc)) from None
    except Image.UnidentifiedImageError:
        raise ReadError(path, "not a readable image (unknown format or broken header)") from None
    except Exception as exc:
        raise ReadError(path, f"not a readable image ({short(exc)})") from None


def _bomb_text(exc: Exception) -> str:
    """Pillow's DecompressionBombError as retina's reason: the sizes as counts, no tail."""
    numbers = [int(n) for n in re.findall(r"\d+", str(exc))]
    if len(numbers) >= 2:
        return _bomb_reason(numbers[0], numbers[1])
    return f"image too large (decompression-bomb guard: {short(exc).split(', could be')[0].rstrip('.')})"


def _bomb_reason(pixels: int, limit: int) -> str:
    return (
        f"image too large: decoded size {sci(pixels)} pixels exceeds the decompression-bomb guard "
        f"(Pillow MAX_IMAGE_PIXELS {sci(limit)})"
    )


def _check_pixels(path: Path, im) -> None:
    """The per-item budget (`--max-pixels`, samples = pixels x bands), then Pillow's own guard, which
    Pillow only warns about between MAX_IMAGE_PIXELS and twice that; retina refuses (no global
    warning filters, which are not thread-safe, are touched). Both from the header, before decoding."""
    check_sample_budget(path, (im.height, im.width, len(im.getbands())), "image")
    limit = _pillow().MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        raise ReadError(path, _bomb_reason(im.width * im.height, limit))


def _exif_orientation(im) -> int:
    """EXIF Orientation (1 = as stored; 2-8 = mirrored and/or rotated), 1 when absent or unreadable."""
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:
        return 1


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


def is_reduced_page(page) -> bool:
    """A thumbnail or reduced-resolution copy of another page (NewSubfileType bit 0, or the old
    SubfileType = 2): not an image of its own, so never a slice."""
    if int(getattr(page, "subfiletype", 0) or 0) & 1:
        return True
    tag = page.tags.get(255) if hasattr(page, "tags") else None  # old-style SubfileType
    return tag is not None and tag.value == 2


def main_pages(tif) -> list[int]:
    """Indices of the full-resolution pages (thumbnails and reduced-resolution pages left out)."""
    count = index_pages(tif)  # first, before anything iterates the pages
    found = [i for i in range(count) if not is_reduced_page(tif.pages[i])]
    return found or [0]


def tiff_header(path: Path) -> ImageHeader:
    """Size, page count and sample layout from the tags (no pixel data is decompressed)."""
    tifffile = quiet_tifffile()

    try:
        with tifffile.TiffFile(path) as tif:
            pages = main_pages(tif)
            page = tif.pages[pages[0]]
            samples = int(getattr(page, "samplesperpixel", 1))
            height, width = int(page.imagelength), int(page.imagewidth)
            page_shape = tuple(int(s) for s in page.shape)
            itemsize = np.dtype(page.dtype).itemsize if page.dtype is not None else 1
            if len(pages) > 1:
                page_shape = (len(pages), *page_shape)
            elif tif.is_imagej or tif.is_ome:  # the series only where it can add to the one page
                series_shape = tuple(int(s) for s in tif.series[0].shape)
                if len(series_shape) == 3 and series_shape[-1] not in (3, 4):
                    page_shape = series_shape  # one IFD holding a stack (ImageJ / OME)
    except ReadError:
        raise
    except Exception as exc:
        raise ReadError(path, f"not a readable TIFF ({short(exc)})") from None
    count = len(pages)
    if count == 1 and len(page_shape) == 3 and page_shape[-1] not in (3, 4):
        count = page_shape[0]
    return ImageHeader(
        "tiff", width, height, samples == 1, pages=count, page_shape=page_shape, itemsize=itemsize
    )


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
            _check_pixels(path, im)
            im.load()
            if _exif_orientation(im) != 1:  # a camera's "rotate for display" flag: show it upright
                from PIL import ImageOps

                im = ImageOps.exif_transpose(im)
            pixels = _to_array(path, im)
    except ReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ReadError(path, _bomb_text(exc)) from None
    except OSError as exc:
        if "truncated" in str(exc).lower() or "broken" in str(exc).lower():
            raise ReadError(path, "image truncated (file ends before the image data does)") from None
        raise ReadError(path, f"cannot decode image ({short(exc)})") from None
    except Exception as exc:
        raise ReadError(path, f"cannot decode image ({short(exc)})") from None
    return pixels, header.format


def tiff_codec_problem(tifffile, page) -> str | None:
    """None when tifffile can decode `page` (its compression and predictor), else why not, naming the
    compression and the package that decodes it. From the tags only: nothing is decompressed."""
    checks = (
        (page.compression, tifffile.TIFF.DECOMPRESSORS, tifffile.COMPRESSION, "compression"),
        (page.predictor, tifffile.TIFF.UNPREDICTORS, tifffile.PREDICTOR, "predictor"),
    )
    for value, table, names, what in checks:
        value = int(value or 1)
        if value <= 1:  # none
            continue
        try:
            table[value]  # resolves the codec; KeyError when no installed package has it
        except KeyError as exc:
            try:
                name = names(value).name
            except ValueError:
                name = str(value)
            if "imagecodecs" in str(exc):
                return f"TIFF {what} {name} needs the 'imagecodecs' package (pip install imagecodecs)"
            return f"TIFF {what} {name} is not supported (neither imagecodecs nor Pillow decodes it)"
    return None


def _pillow_tiff_page(path: Path, index: int) -> np.ndarray | None:
    """Page `index` through Pillow's libtiff (codecs tifffile lacks), under the same guards; None when
    Pillow cannot decode it either."""
    Image = _pillow()
    try:
        with Image.open(path) as im:
            im.seek(index)
            _check_pixels(path, im)
            im.load()
            return _to_array(path, im)
    except ReadError:
        raise
    except Exception:
        return None


def load_tiff_page(path: Path) -> np.ndarray:
    """The first full-resolution page (budget checked from its tags before it is decompressed).

    LZW, Deflate, PackBits, JPEG, ... through tifffile + imagecodecs; a single-page file whose codec
    tifffile lacks goes through Pillow's libtiff instead."""
    tifffile = quiet_tifffile()

    header = tiff_header(path)
    shape = header.page_shape[1:] if header.pages > 1 else header.page_shape
    check_sample_budget(path, shape, "TIFF page", header.itemsize)
    problem = None
    try:
        with tifffile.TiffFile(path) as tif:
            index = main_pages(tif)[0]
            problem = tiff_codec_problem(tifffile, tif.pages[index])
            pixels = None if problem else tif.pages[index].asarray()
    except Exception as exc:
        raise ReadError(path, f"cannot decode TIFF ({short(exc)})") from None
    if pixels is None and header.pages == 1:
        pixels = _pillow_tiff_page(path, index)
    if pixels is None:
        raise ReadError(path, problem or "cannot decode TIFF")
    if pixels.ndim == 3 and pixels.shape[0] in (3, 4) and pixels.shape[-1] not in (3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # planar RGB
    return pixels


def read_fundus_image(path: Path) -> FundusImage:
    pixels, fmt = load_image(path)
    return FundusImage(str(path), np.ascontiguousarray(as_fundus_array(path, pixels)), fmt, ImageMeta())
