"""Readers: OCT volumes and fundus images from DICOM, image folders, TIFF, .npy, Heidelberg .vol and
HEYEX XML exports.

Public API (torch-free; pixel decoders are imported lazily):

- `read_item(path) -> OctVolume | FundusImage`: the one item at `path` (a .vol gives its OCT);
- `read_items(path) -> list[Item]`: every item at `path` (a .vol or a HEYEX XML export gives OCT +
  IR-SLO fundus);
- `read_oct(path)`, `read_fundus(path)`: the item of that modality, or `ReadError` saying what it is;
- `discover(paths) -> (sources, errors)`: paths of the volumes/images found (no pixels decoded);
- `scan(paths) -> Discovery`: the same with each source's kind, modalities and header metadata,
  and the ignored (non-image) files;
- `iter_items(paths, modality=None)`: yields `OctVolume | FundusImage | ReadError`, one source at a
  time, so one bad file never stops a batch.

Every failure is a `retinacli.errors.ReadError(path, reason)`. See docs/data-layout.md.

Every reader refuses an item whose declared decoded size (header, codestream or TIFF tags) exceeds the
per-item budget in samples, before allocating it: `retinacli.readers.common.set_max_pixels(n)` (what
`--max-pixels` calls), else $RETINA_MAX_PIXELS, else 2**27.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from retinacli.errors import ReadError
from retinacli.items import FundusImage, Item, OctVolume
from retinacli.readers.common import Source, natural_key, normalise_pixels
from retinacli.readers.discover import Discovery, scan

__all__ = [
    "Discovery",
    "Source",
    "discover",
    "iter_items",
    "natural_key",
    "read_fundus",
    "read_item",
    "read_items",
    "read_oct",
    "read_source",
    "scan",
]

_MODALITY_WORDS = {"oct": "an OCT volume", "fundus": "a fundus image"}


def read_source(
    source: Source,
    modality: str | None = None,
    *,
    oct_frames: Callable[[int], Sequence[int]] | None = None,
) -> list[Item]:
    """Decode one discovered source (all its items, or only those of `modality`).

    The dataset discovery parsed (``source.header``) is decoded as it is: no header is parsed twice.
    `oct_frames` maps an OCT volume's B-scan count to the B-scans the caller needs (the pipeline:
    ``lambda n: slice_indices(n, spec slices)``): OCT readers that can (uncompressed and per-frame
    compressed DICOM, single-frame DICOM series, B-scan image folders, TIFF stacks, .npy) then
    decode only those B-scans and return a volume holding just them, in that order, with the full
    count in ``meta.extra["bscans"]``; the others (.vol, HEYEX XML) decode the whole volume.
    """
    if modality is not None and modality not in source.modalities:
        return []
    kind = source.kind
    path = source.path
    if kind == "dicom":
        from retinacli.readers.dicom import read_dicom

        items: list[Item] = [read_dicom(path, header=source.header, oct_frames=oct_frames)]
    elif kind == "dicom-series":
        from retinacli.readers.dicom import read_dicom_series

        items = [read_dicom_series(path, source.members, source.header, oct_frames=oct_frames)]
    elif kind == "image":
        from retinacli.readers.images import read_fundus_image

        items = [read_fundus_image(path)]
    elif kind == "bscan-folder":
        from retinacli.readers.volumes import read_bscan_folder

        items = [read_bscan_folder(path, source.members, oct_frames=oct_frames)]
    elif kind == "tiff":
        from retinacli.readers.volumes import read_tiff_stack

        items = [read_tiff_stack(path, oct_frames=oct_frames)]
    elif kind == "npy":
        from retinacli.readers.volumes import read_npy

        items = [read_npy(path, oct_frames=oct_frames)]
    elif kind == "vol":
        from retinacli.readers.heidelberg import read_vol

        items = list(read_vol(path))
    elif kind == "heyex-xml":
        from retinacli.readers.heyex_xml import read_heyex_series

        number = int(source.meta("oct").extra.get("heyex_series", 1))
        items = read_heyex_series(path, source.members[0], number, modality)
    else:  # pragma: no cover - discovery only makes the kinds above
        raise ReadError(path, f"unknown source kind {kind!r}")
    for item in items:
        item.path = str(path)
        item.pixels = normalise_pixels(path, item.pixels)
    return [item for item in items if modality is None or item.modality == modality]


def _single_source(path: Path) -> Source:
    found = scan([path])
    if found.sources:
        if len(found.sources) == 1:
            return found.sources[0]
        # a folder holding one B-scan series (or B-scan stack) next to other files, e.g. its localizer:
        # the folder's own path names the series
        own = [source for source in found.sources if source.path == path]
        if len(own) == 1:
            return own[0]
        raise ReadError(
            path,
            f"folder holds {len(found.sources)} separate images/volumes; read them with iter_items() "
            "or `retina inspect`",
        )
    if found.errors:
        raise found.errors[0]
    if found.ignored:
        ignored_path, why = found.ignored[0]
        raise ReadError(path, why if ignored_path == path else "no readable OCT volume or fundus image found")
    raise ReadError(path, "no readable OCT volume or fundus image found")


def read_items(path: str | Path) -> list[Item]:
    """Every item at `path` (a file, a B-scan folder, or a single-series DICOM folder)."""
    return read_source(_single_source(Path(path)))


def read_item(path: str | Path) -> Item:
    """The item at `path`; for a Heidelberg .vol (OCT + SLO) the OCT volume."""
    return read_items(path)[0]


def _read_modality(path: str | Path, modality: str) -> Item:
    path = Path(path)
    if modality == "oct" and path.is_dir():
        source = _bscan_folder_source(path)
        if source is not None:
            return read_source(source, "oct")[0]
    source = _single_source(path)
    if modality not in source.modalities:
        actual = _MODALITY_WORDS[source.modalities[0]]
        raise ReadError(path, f"is {actual}, not {_MODALITY_WORDS[modality]}")
    return read_source(source, modality)[0]


def _bscan_folder_source(path: Path) -> Source | None:
    """`read_oct(folder)`: the user says it is a volume, so every image in it is a B-scan."""
    from retinacli.readers.common import IMAGE_SUFFIXES, TIFF_SUFFIXES

    found = scan([path])
    if len(found.sources) == 1 or any(s.kind != "image" for s in found.sources):
        return None
    suffixes = IMAGE_SUFFIXES | TIFF_SUFFIXES
    members = sorted(
        (p for p in path.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )
    if not members:
        return None
    return Source(path, "bscan-folder", ("oct",), members=tuple(members), format="bscan-folder")


def read_oct(path: str | Path) -> OctVolume:
    """The OCT volume at `path`; `ReadError` ("is a fundus image, not an OCT volume") otherwise."""
    return _read_modality(path, "oct")  # type: ignore[return-value]


def read_fundus(path: str | Path) -> FundusImage:
    """The fundus image at `path` (a .vol gives its IR-SLO); `ReadError` for an OCT volume."""
    return _read_modality(path, "fundus")  # type: ignore[return-value]


def discover(paths: Iterable[str | Path] | str | Path) -> tuple[list[Path], list[ReadError]]:
    """Paths of the sources under `paths` (folders walked) and the files that could not be read."""
    found = scan(paths)
    return [source.path for source in found.sources], found.errors


def iter_items(
    paths: Iterable[str | Path] | str | Path, modality: str | None = None
) -> Iterator[OctVolume | FundusImage | ReadError]:
    """Discover, then read one source at a time; failures are yielded as `ReadError`, not raised."""
    if modality not in (None, "oct", "fundus"):
        raise ValueError(f"modality must be 'oct', 'fundus' or None, not {modality!r}")
    found = scan(paths)
    yield from found.errors
    for source in found.sources:
        if modality is not None and modality not in source.modalities:
            continue
        try:
            yield from read_source(source, modality)
        except ReadError as exc:
            yield exc
        except MemoryError:
            yield ReadError(source.path, "not enough memory to read this item")
        except Exception as exc:  # a reader bug must not stop the batch; report it as this file's error
            # the type only: a parser's message can quote a header value (a patient's name)
            yield ReadError(source.path, f"unexpected read failure ({type(exc).__name__})")
