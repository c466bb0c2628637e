"""OCT volumes that are not DICOM: B-scan image folders, multi-page TIFF, and .npy arrays (.npy can
also hold a fundus image: decided by its shape)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from retinacli.errors import ReadError
from retinacli.items import FundusImage, ImageMeta, OctVolume
from retinacli.readers.common import as_fundus_array, check_sample_budget, short, to_grayscale
from retinacli.readers.images import (
    image_header,
    load_image,
    main_pages,
    quiet_tifffile,
    tiff_codec_problem,
    tiff_header,
)

# Maps a volume's B-scan count to the indices of the B-scans wanted (readers.read_source's oct_frames).
FramePicker = Callable[[int], Sequence[int]]


def wanted_frames(path: Path, oct_frames: FramePicker, count: int) -> tuple[list[int], list[int]]:
    """(the B-scan indices `oct_frames` picks of `count`, in its order; the same, unique and ascending)."""
    wanted = [int(i) for i in oct_frames(count)]
    if not wanted or min(wanted) < 0 or max(wanted) >= count:
        raise ValueError(f"{path}: B-scan indices must lie in 0..{count - 1}")
    return wanted, sorted(set(wanted))


def pick_rows(stack: np.ndarray, wanted: list[int], unique: list[int]) -> np.ndarray:
    """`stack` holds the `unique` B-scans (ascending): return them in `wanted` order, repeats included."""
    rows = {frame: row for row, frame in enumerate(unique)}
    return stack[[rows[i] for i in wanted]]


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the .npy header (nothing else is read)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ReadError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    except Exception as exc:
        raise ReadError(path, f"not a .npy array ({short(exc)})") from None
    if dtype.hasobject:
        raise ReadError(path, ".npy holds Python objects; only numeric arrays are read")
    return tuple(int(s) for s in shape), dtype


def npy_modality(path: Path, shape: tuple[int, ...]) -> str:
    """(n, H, W) -> oct; (H, W) or (H, W, 1|3|4) -> fundus."""
    if len(shape) == 2:
        return "fundus"
    if len(shape) == 3:
        return "fundus" if shape[2] in (1, 3, 4) else "oct"
    if len(shape) == 4 and shape[3] == 1:
        return "oct"
    raise ReadError(path, f"array shape {shape} is neither an OCT volume (n, H, W) nor an image (H, W[, C])")


def read_npy(path: Path, oct_frames: FramePicker | None = None) -> OctVolume | FundusImage:
    """An OCT volume or fundus image from a .npy; with `oct_frames`, only those B-scans of a volume
    are copied out of the memory-mapped file."""
    shape, dtype = npy_header(path)
    modality = npy_modality(path, shape)
    check_sample_budget(path, shape, "array", dtype.itemsize)
    if dtype.kind not in "uifb":
        raise ReadError(path, f"unsupported array dtype {dtype}")
    if 0 in shape:
        raise ReadError(path, f"empty array (shape {shape})")
    picks = wanted_frames(path, oct_frames, shape[0]) if modality == "oct" and oct_frames else None
    try:
        # memory-mapped first: a header that declares more data than the file holds fails here,
        # before numpy allocates the declared size
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        pixels = np.array(mapped if picks is None else mapped[picks[1]])  # only the picked B-scans
        del mapped
    except Exception as exc:
        raise ReadError(path, f"truncated or unreadable .npy ({short(exc)})") from None
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype.kind == "f" and pixels.dtype != np.float32:
        pixels = pixels.astype(np.float32)
    if modality == "oct":
        if pixels.ndim == 4:
            pixels = pixels[..., 0]
        meta = ImageMeta()
        if picks is not None:
            pixels = pick_rows(pixels, *picks)
            meta.extra["bscans"] = shape[0]
        return OctVolume(str(path), np.ascontiguousarray(pixels), "npy", meta)
    return FundusImage(str(path), np.ascontiguousarray(as_fundus_array(path, pixels)), "npy", ImageMeta())


def read_tiff_stack(path: Path, oct_frames: FramePicker | None = None) -> OctVolume:
    """Full-resolution pages -> (n_bscans, H, W). Thumbnail / reduced-resolution pages are not slices;
    colour pages are B-scans only when they are gray (R = G = B), else the file is refused. Compressed
    pages (LZW, Deflate, PackBits, JPEG, ...) decode through tifffile + imagecodecs. With
    `oct_frames` only the pages it picks are decoded (every page's size and codec still checked)."""
    bscans = None
    tifffile = quiet_tifffile()

    header = tiff_header(path)
    check_sample_budget(path, header.page_shape, "TIFF pages", header.itemsize)
    try:
        with tifffile.TiffFile(path) as tif:
            pages = main_pages(tif)
            shapes = [tuple(tif.pages[i].shape) for i in pages]
            if len(set(shapes)) > 1:
                odd = next(i for i, shape in enumerate(shapes) if shape != shapes[0])
                raise ReadError(
                    path,
                    f"TIFF pages differ in size: page {odd + 1} is {shapes[odd]}, page 1 {shapes[0]}",
                )
            if len(pages) > 1:
                check_sample_budget(path, (len(shapes), *shapes[0]), "TIFF pages", header.itemsize)
            for index in pages:  # every page's codec, from its tags, before anything is decompressed
                problem = tiff_codec_problem(tifffile, tif.pages[index])
                if problem:
                    raise ReadError(path, problem)
            if len(pages) == 1:  # one page (or an ImageJ / OME series) holding the whole stack
                whole = tif.is_imagej or tif.is_ome
                pixels = tif.series[0].asarray() if whole else tif.pages[pages[0]].asarray()
            else:
                wanted = unique = list(range(len(pages)))
                if oct_frames is not None:  # only the picked pages are decompressed
                    wanted, unique = wanted_frames(path, oct_frames, len(pages))
                    bscans = len(pages)
                pixels = None
                for k, index in enumerate(unique):  # page by page: no second full-size copy
                    page = tif.pages[pages[index]].asarray()
                    if pixels is None:
                        pixels = np.empty((len(unique), *page.shape), page.dtype)
                    pixels[k] = page
                if bscans is not None:
                    pixels = pick_rows(pixels, wanted, unique)
    except ReadError:
        raise
    except Exception as exc:
        raise ReadError(path, f"cannot decode TIFF ({short(exc)})") from None
    if pixels.ndim == 4 and pixels.shape[1] in (3, 4) and pixels.shape[-1] not in (3, 4):
        pixels = np.moveaxis(pixels, 1, -1)  # planar RGB pages
    if pixels.ndim == 4 and pixels.shape[-1] in (3, 4):
        gray = (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        if not gray:
            raise ReadError(
                path,
                f"multi-page colour TIFF ({pixels.shape[0]} pages): not an OCT volume, whose B-scans are "
                "grayscale; save each photo as its own file to read it as a fundus image",
            )
        pixels = pixels[..., 0]
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3:
        raise ReadError(path, f"TIFF stack has shape {tuple(pixels.shape)}, expected (n_bscans, H, W)")
    if oct_frames is not None and bscans is None:  # one IFD holding the stack: decoded whole, then picked
        bscans = pixels.shape[0]
        wanted, unique = wanted_frames(path, oct_frames, bscans)
        pixels = pick_rows(pixels[unique], wanted, unique)
    meta = ImageMeta(extra={"bscans": bscans}) if bscans is not None else ImageMeta()
    return OctVolume(str(path), np.ascontiguousarray(pixels), "tiff", meta)


def read_bscan_folder(
    path: Path, members: tuple[Path, ...], oct_frames: FramePicker | None = None
) -> OctVolume:
    """Numbered B-scan images (already in natural order) -> (n_bscans, H, W). With `oct_frames` only
    the image files it picks are decoded; every file's size is still checked (from its header)."""
    if not members:
        raise ReadError(path, "folder holds no B-scan images")
    meta = ImageMeta(extra={"files": len(members)})
    if oct_frames is None:
        return OctVolume(str(path), stack_bscans(path, members), "bscan-folder", meta)
    wanted, unique = wanted_frames(path, oct_frames, len(members))
    sizes = []
    for member in members:
        header = image_header(member)
        sizes.append((header.height, header.width))
        if sizes[-1] != sizes[0]:
            raise ReadError(path, f"B-scans differ in size: {member.name} has shape {sizes[-1]}, "
                                  f"the others {sizes[0]}")
    check_sample_budget(path, (len(members), *sizes[0]))
    stack = stack_bscans(path, [members[i] for i in unique], total=len(members))
    meta.extra["bscans"] = len(members)
    return OctVolume(str(path), pick_rows(stack, wanted, unique), "bscan-folder", meta)


def stack_bscans(path: Path, members, total: int | None = None) -> np.ndarray:
    """One image file per B-scan (in order) -> (n_bscans, H, W), grayscale; errors name `path` (the
    volume). The budget is checked for the whole stack (`total` B-scans: all of `members` unless
    said) once the first B-scan's size is known."""
    total = len(members) if total is None else total
    scans: list[np.ndarray] = []
    for member in members:
        pixels, _fmt = load_image(member)
        if pixels.ndim == 3:
            pixels = to_grayscale(pixels)
        if scans and pixels.shape != scans[0].shape:
            shapes = f"{member.name} has shape {pixels.shape}, the others {scans[0].shape}"
            raise ReadError(path, f"B-scans differ in size: {shapes}")
        scans.append(pixels)
        check_sample_budget(path, (total, *scans[0].shape))  # the whole stack, before the rest
    return np.stack(scans)
