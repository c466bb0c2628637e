"""Heidelberg HEYEX XML export: a folder with one `.xml` file (root `HEDX`), one image file per B-scan and
the IR/SLO localizer image. Each OCT series of the XML reads as one OCT volume (B-scans in the XML's order)
plus its localizer as a grayscale fundus image, with laterality, dates, device and scan geometry from the
XML (layout as in eyepy's `HeXmlReader`, the reference implementation; eyepy itself is not needed).

Safety: the XML is size-capped before it is read and parsed by the standard library with DOCTYPE and
ENTITY declarations refused (no entity expansion). Each ExamURL (real exports hold Windows paths,
``file:///C:\\...\\90F83740.tif``) is resolved by its file name inside the export folder only. Patient
fields (name, IDs, birth date) stay in `ImageMeta.patient_id` / `patient_name`, internal only.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retinacli.errors import ReadError
from retinacli.items import FundusImage, ImageMeta, OctVolume
from retinacli.readers.common import (
    as_fundus_array,
    check_sample_budget,
    normalise_laterality,
    short,
)
from retinacli.readers.sanitize import device_name, iso_date, iso_datetime

FORMAT = "heyex-xml"
# HEYEX XML with segmentation lines of a large volume is tens of MB; more is not an export.
MAX_XML_BYTES = 128 * 1024 * 1024
_HEAD_BYTES = 64 * 1024
_ROOT = re.compile(rb"<(?:[A-Za-z_][\w.\-]*:)?HEDX[\s>/]")
# Every HEYEX OCT export comes from a Spectralis; the canonical name comes from the fixed device table.
DEVICE = device_name("Heidelberg Engineering", "Spectralis")


@dataclass
class HeyexSeries:
    """One OCT series of an export: its B-scan files (XML order), its localizer file, its metadata."""

    number: int  # 1-based, in the XML's order of OCT series
    bscans: list[Path]
    localizer: Path | None
    shape: tuple[int, int] | None  # declared (Height, Width) of the B-scans, when given
    metas: dict[str, ImageMeta] = field(default_factory=dict)


def is_heyex_xml(path: Path) -> bool:
    """Whether `path` looks like a HEYEX export (an `HEDX` root element near the start); cheap."""
    if path.suffix.lower() != ".xml":
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError:
        return False
    return bool(_ROOT.search(head))


class _Refused(Exception):
    pass


def _refuse_doctype(*_args) -> None:
    raise _Refused("DOCTYPE declarations are refused (possible entity expansion)")


def _refuse_entity(*_args) -> None:
    raise _Refused("ENTITY declarations are refused (no entity expansion)")


def _parse_bytes(path: Path, data: bytes) -> ElementTree.Element:
    """expat straight into an ElementTree, with every declaration handler refusing: no DTD is ever read,
    so no entity is ever expanded. Namespaces are dropped (some exports carry one on the root)."""
    from xml.parsers import expat

    builder = ElementTree.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")
    parser.buffer_text = True
    parser.StartDoctypeDeclHandler = _refuse_doctype
    parser.EntityDeclHandler = _refuse_entity
    parser.UnparsedEntityDeclHandler = _refuse_entity
    parser.ExternalEntityRefHandler = _refuse_entity
    parser.StartElementHandler = lambda tag, attrs: builder.start(tag.rsplit("}", 1)[-1], {})
    parser.EndElementHandler = lambda tag: builder.end(tag.rsplit("}", 1)[-1])
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
        return builder.close()
    except _Refused as exc:
        raise ReadError(path, f"unsafe XML: {exc}") from None
    except expat.ExpatError as exc:
        raise ReadError(path, f"malformed XML ({short(exc)})") from None
    except Exception as exc:  # the type only: a message could quote the file's text
        raise ReadError(path, f"malformed XML ({type(exc).__name__})") from None


def parse_xml(path: Path) -> ElementTree.Element:
    """The XML's `BODY` element; ReadError for an oversized, unsafe, malformed or non-HEYEX file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ReadError(path, f"cannot open ({short(exc)})") from None
    if size == 0:
        raise ReadError(path, "empty file (0 bytes)")
    if size > MAX_XML_BYTES:
        raise ReadError(
            path,
            f"XML too large ({size / 1e6:.0f} MB; a HEYEX export's XML is at most "
            f"{MAX_XML_BYTES // (1024 * 1024)} MiB here)",
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_XML_BYTES + 1)
    except OSError as exc:
        raise ReadError(path, f"cannot open ({short(exc)})") from None
    root = _parse_bytes(path, data)
    if root.tag != "HEDX":
        raise ReadError(path, "not a HEYEX XML export (root element is not HEDX)")
    body = root.find("BODY")
    if body is None:
        raise ReadError(path, "not a HEYEX XML export (no BODY element)")
    return body


def _text(element: ElementTree.Element | None, xpath: str) -> str | None:
    if element is None:
        return None
    found = element.find(xpath)
    if found is None or found.text is None:
        return None
    return found.text.strip() or None


def _number(path: Path, element: ElementTree.Element | None, xpath: str) -> float | None:
    """A numeric field, or None when absent; a field that is not a finite number is an error naming it."""
    text = _text(element, xpath)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ReadError(path, f"invalid {xpath.rsplit('/', 1)[-1]} in XML (not a number)") from None
    if not np.isfinite(value):
        raise ReadError(path, f"invalid {xpath.rsplit('/', 1)[-1]} in XML (not a finite number)")
    return value


def _date(element: ElementTree.Element | None) -> str | None:
    """<Date><Year/><Month/><Day/></Date> -> YYYY-MM-DD (validated), else None."""
    if element is None:
        return None
    try:
        parts = [int(_text(element, name) or "") for name in ("Year", "Month", "Day")]
    except ValueError:
        return None
    return iso_date(f"{parts[0]:04d}-{parts[1]:02d}-{parts[2]:02d}")


def _time(element: ElementTree.Element | None) -> str | None:
    """<Time><Hour/><Minute/><Second/></Time> -> HH:MM:SS, else None (validated by iso_datetime)."""
    if element is None:
        return None
    try:
        hour, minute = int(_text(element, "Hour") or ""), int(_text(element, "Minute") or "")
        second = int(float(_text(element, "Second") or "0"))
    except ValueError:
        return None
    return f"{hour:02d}:{minute:02d}:{second:02d}"


def _image_type(image: ElementTree.Element) -> str:
    return (_text(image, "ImageType/Type") or "").upper()


def _resolve(path: Path, folder: Path, url: str | None, listing: dict[str, str]) -> Path:
    """An ExamURL -> the file of that name inside `folder` (never outside it)."""
    if not url:
        raise ReadError(path, "an image has no ExamURL")
    text = re.sub(r"^file:/*", "", url.strip(), flags=re.IGNORECASE)
    parts = [part for part in re.split(r"[\\/]+", text) if part]
    # the export's own absolute paths (C:\XMLDATA\...) name the file; a relative one that climbs does not
    name = parts[-1] if parts else ""
    if ".." in parts or name in ("", ".") or "\x00" in name:
        raise ReadError(path, "an ExamURL points outside the export folder")
    found = listing.get(name) or listing.get(name.casefold())  # Windows names are case-insensitive
    if found is None:
        raise ReadError(path, f"B-scan or localizer file {_shown(name)} named in the XML is missing")
    return folder / found


def _shown(name: str) -> str:
    """A file name for a message: kept when it looks like an export's own name (hex IDs), else withheld."""
    return repr(name) if re.fullmatch(r"[\w.\-]{1,80}", name) else "(name withheld)"


def _listing(folder: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    try:
        for entry in folder.iterdir():
            if entry.is_file():
                files[entry.name] = entry.name
                files.setdefault(entry.name.casefold(), entry.name)
    except OSError:
        pass
    return files


def _spacing(path: Path, bscans: list[ElementTree.Element]) -> float:
    """Mean distance (mm) between consecutive B-scans' start and end points, as eyepy computes it."""
    points = []
    for image in bscans:
        context = image.find("OphthalmicAcquisitionContext")
        coords = [_number(path, context, f"{end}/Coord/{axis}") for end in ("Start", "End") for axis in "XY"]
        if any(value is None for value in coords):
            return 0.0
        points.append(coords)
    if len(points) < 2:
        return 0.0
    array = np.asarray(points, dtype=np.float64)
    starts = np.hypot(*(array[1:, :2] - array[:-1, :2]).T)
    ends = np.hypot(*(array[1:, 2:] - array[:-1, 2:]).T)
    return float(np.mean(np.concatenate([starts, ends])))


def _scales(path: Path, image: ElementTree.Element | None) -> tuple[float, float] | None:
    context = image.find("OphthalmicAcquisitionContext") if image is not None else None
    scale_y, scale_x = _number(path, context, "ScaleY"), _number(path, context, "ScaleX")
    if scale_y is None or scale_x is None:
        return None
    return scale_y, scale_x


def parse_export(xml_path: Path) -> list[HeyexSeries]:
    """Every OCT series of a HEYEX XML export, checked (files present, in the folder) without pixels."""
    xml_path = Path(xml_path)
    body = parse_xml(xml_path)
    folder = xml_path.parent
    listing = _listing(folder)
    patient = body.find("Patient")
    pid = _text(patient, "PatientID") or _text(patient, "ID")
    names = [_text(patient, "LastName"), _text(patient, "FirstNames")]
    name = "^".join(part for part in names if part) or None
    study_date_all = _date(body.find("Patient/Study/StudyDate/Date"))
    found: list[HeyexSeries] = []
    for series in body.iter("Series"):
        images = series.findall("Image")
        bscans = [image for image in images if _image_type(image) == "OCT"]
        if not bscans:
            continue
        localizer = next((image for image in images if _image_type(image) == "LOCALIZER"), None)
        files = [_resolve(xml_path, folder, _text(image, "ImageData/ExamURL"), listing) for image in bscans]
        loc_file = None
        if localizer is not None:
            loc_file = _resolve(xml_path, folder, _text(localizer, "ImageData/ExamURL"), listing)
        context = bscans[0].find("OphthalmicAcquisitionContext")
        width, height = _number(xml_path, context, "Width"), _number(xml_path, context, "Height")
        shape = (int(height), int(width)) if width and height else None
        if shape is not None:
            check_sample_budget(xml_path, (len(bscans), *shape), "B-scan data")
        laterality = normalise_laterality(_text(series, "Laterality") or _text(bscans[0], "Laterality"))
        exam_date = (
            _date(series.find("ExamDate/Date"))
            or _date(series.find("ReferenceSeries/ExamDate/Date"))
            or study_date_all
        )
        study_date = study_date_all or exam_date

        def when(image: ElementTree.Element | None, day: str | None = exam_date) -> str | None:
            clock = _time(image.find("AcquisitionTime/Time")) if image is not None else None
            return iso_datetime(day, clock) if day else None

        common = {
            "laterality": laterality,
            "study_date": study_date,
            "device": DEVICE,
            "patient_id": pid,
            "patient_name": name,
        }
        scales = _scales(xml_path, bscans[0])
        number = len(found) + 1
        oct_meta = ImageMeta(
            acquisition_datetime=when(bscans[0]),
            pixel_spacing_mm=(_spacing(xml_path, bscans), *scales) if scales else None,
            photometric="MONOCHROME2",
            extra={"heyex_series": number, "files": len(files)},
            **common,
        )
        metas = {"oct": oct_meta}
        if loc_file is not None:
            metas["fundus"] = ImageMeta(
                acquisition_datetime=when(localizer) or when(bscans[0]),
                pixel_spacing_mm=_scales(xml_path, localizer),
                photometric="MONOCHROME2",
                extra={"heyex_series": number, "image_type": "IR/SLO localizer"},
                **common,
            )
        found.append(HeyexSeries(number, files, loc_file, shape, metas))
    if not found:
        raise ReadError(xml_path, "HEYEX XML export holds no OCT images")
    return found


def referenced_files(series: list[HeyexSeries]) -> set[Path]:
    """The image files an export's series use (discovery does not list them again)."""
    files: set[Path] = set()
    for one in series:
        files.update(one.bscans)
        if one.localizer is not None:
            files.add(one.localizer)
    return files


def _load(path: Path) -> np.ndarray:
    from retinacli.readers.images import load_image

    pixels, _fmt = load_image(path)
    return pixels


def read_heyex_series(
    source_path: Path, xml_path: Path, number: int, modality: str | None = None
) -> list[OctVolume | FundusImage]:
    """The OCT volume (n_bscans, H, W) and the localizer (H, W, 1 or 3) of series `number` (1-based);
    `modality` "oct" / "fundus": that item only (the other's pixels are not decoded)."""
    all_series = parse_export(xml_path)
    if not 1 <= number <= len(all_series):
        raise ReadError(source_path, f"HEYEX XML export has no OCT series {number}")
    series = all_series[number - 1]
    items: list[OctVolume | FundusImage] = []
    if modality in (None, "oct"):
        from retinacli.readers.volumes import stack_bscans

        volume = stack_bscans(source_path, series.bscans)
        items.append(OctVolume(str(source_path), volume, FORMAT, series.metas["oct"]))
    if series.localizer is not None and modality in (None, "fundus"):
        loc = as_fundus_array(series.localizer, _load(series.localizer))
        items.append(FundusImage(str(source_path), np.ascontiguousarray(loc), FORMAT, series.metas["fundus"]))
    return items


_PATIENT_FIELD = re.compile(rb"<(?:[\w.\-]+:)?(PatientID|LastName|FirstNames)>([^<]{1,200})<")
_PATIENT_NUMBER = re.compile(rb"<(?:[\w.\-]+:)?Patient>\s*<(?:[\w.\-]+:)?ID>([^<]{1,64})<")


def export_identifiers(path: Path) -> list[str]:
    """Best effort, for an export that failed to read (its XML, its folder or a series' virtual path):
    the patient fields its XML still shows, found by a plain text search (no parsing, so a truncated or
    unsafe XML gives them too), patient ID first. Nothing when no HEYEX XML is there."""
    path = Path(path)
    if not path.exists() and path.parent.is_dir():
        path = path.parent  # "<folder>/series=heyex-<n>"
    try:
        xmls = [path] if path.is_file() else sorted(p for p in path.glob("*.xml") if p.is_file())
        found: dict[str, str] = {}
        for xml in xmls:
            if not is_heyex_xml(xml):
                continue
            with open(xml, "rb") as handle:
                head = handle.read(_HEAD_BYTES * 16)  # the patient comes before the images
            for name, value in _PATIENT_FIELD.findall(head):
                found.setdefault(name.decode(), value.decode("utf-8", "replace").strip())
            number = _PATIENT_NUMBER.search(head)
            if number:
                found.setdefault("ID", number.group(1).decode("utf-8", "replace").strip())
    except OSError:
        return []
    order = ("PatientID", "ID", "LastName", "FirstNames")
    return [found[key] for key in order if found.get(key)]
