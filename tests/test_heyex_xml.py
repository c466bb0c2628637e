"""Heidelberg HEYEX XML exports (retinacli/readers/heyex_xml.py): a folder with one XML file (eyepy's
`HeXmlReader` layout), one image file per B-scan and the IR/SLO localizer, all made here.

The XML carries a planted patient (name, IDs, birth date): it must reach no output of inspect, embed,
predict, retrieve or pair, while pairing still groups by it (pseudonymised)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_packages import make_toy_package
from PIL import Image

from retinacli.errors import ReadError
from retinacli.readers import iter_items, read_fundus, read_items, read_oct, scan
from retinacli.readers.common import SERIES_PREFIX
from retinacli.readers.heyex_xml import MAX_XML_BYTES

LAST, FIRST, PATIENT_ID, INTERNAL_ID = "Doeplanted", "Janeplanted", "PID-4242-SECRET", "424299"
BIRTH = (1950, 1, 1)
# Every spelling of the planted identifiers an output could carry.
# "-4242-": a piece of the ID left by a partial redaction (a bare "4242" also matched printed scores and
# hexadecimal pseudonyms by chance)
PLANTED = [LAST, FIRST, PATIENT_ID, "-4242-", INTERNAL_ID, "1950-01-01", "19500101", "01.01.1950"]

N, H, W = 5, 48, 64  # B-scans, rows, columns
LOC = 96  # localizer side
SCALE_X, SCALE_Y, LOC_SCALE = 0.0113, 0.0039, 0.0117
DISTANCE = 0.123  # mm between B-scans (start and end points move by this in y)


def _date(year: int, month: int, day: int) -> str:
    return f"<Date><Year>{year}</Year><Month>{month}</Month><Day>{day}</Day></Date>"


def _time(hour: int, minute: int, second: float) -> str:
    return (
        f"<Time><Hour>{hour}</Hour><Minute>{minute}</Minute><Second>{second}</Second>"
        "<UTCBias>60</UTCBias></Time>"
    )


def _image(
    number: int,
    kind: str,
    url: str,
    width: int,
    height: int,
    scale_x: float,
    scale_y: float,
    extra: str = "",
    when=(10, 11, 12.5),
) -> str:
    localizer = kind == "LOCALIZER"
    context = (
        f"<Width>{width}</Width><Height>{height}</Height><ScaleX>{scale_x}</ScaleX>"
        f"<ScaleY>{scale_y}</ScaleY>" + ("<Angle>30</Angle><Focus>-0.5</Focus>" if localizer else extra)
    )
    return (
        f"<Image><ID>{number}</ID><ImageNumber>{number}</ImageNumber><Laterality>R</Laterality>"
        f"<AcquisitionTime>{_time(*when)}</AcquisitionTime>"
        f"<ImageType><Type>{kind}</Type></ImageType>"
        f"<OphthalmicAcquisitionContext>{context}</OphthalmicAcquisitionContext>"
        f"<ImageData><ExamURL>{url}</ExamURL></ImageData></Image>"
    )


def _series(
    series_id: int, laterality: str, files: list[str], localizer: str, exam=(2021, 3, 4), shape=(H, W)
) -> str:
    images = [_image(0, "LOCALIZER", localizer, LOC, LOC, LOC_SCALE, LOC_SCALE, when=(10, 11, 2.0))]
    for k, url in enumerate(files):
        y = 1.0 + k * DISTANCE
        coords = (
            f"<Start><Coord><X>0.5</X><Y>{y:.4f}</Y></Coord></Start>"
            f"<End><Coord><X>{0.5 + shape[1] * SCALE_X:.4f}</X><Y>{y:.4f}</Y></Coord></End>"
        )
        images.append(_image(k + 1, "OCT", url, shape[1], shape[0], SCALE_X, SCALE_Y, coords))
    return (
        f"<Series><ID>{series_id}</ID><Laterality>{laterality}</Laterality><Type>Volume</Type>"
        f"<ExamDate>{_date(*exam)}</ExamDate>"
        f"<ReferenceSeries><ID>{series_id}</ID><ExamDate>{_date(*exam)}</ExamDate></ReferenceSeries>"
        f"<NumImages>{len(images)}</NumImages>{''.join(images)}</Series>"
    )


def _xml(series: list[str], study=(2021, 3, 4)) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<HEDX><BODY>'
        "<SWVersion><Name>HEYEX</Name><Version>1.10.4.0</Version></SWVersion>"
        f"<Patient><ID>{INTERNAL_ID}</ID><PatientID>{PATIENT_ID}</PatientID>"
        f"<LastName>{LAST}</LastName><FirstNames>{FIRST}</FirstNames>"
        f"<Birthdate>{_date(*BIRTH)}</Birthdate><Sex>F</Sex>"
        f"<Study><ID>7</ID><StudyDate>{_date(*study)}</StudyDate>{''.join(series)}</Study>"
        "</Patient></BODY></HEDX>\n"
    )


def _write_images(folder: Path, names: list[str], seed: int, shape=(H, W)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for name in names:
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        arrays.append(pixels)
    return arrays


def write_export(folder: Path, laterality: str = "R", seed: int = 0, exam=(2021, 3, 4), series: int = 1):
    """A HEYEX-style export -> {"bscans": [series' B-scan arrays in XML order], "localizer": [arrays]}."""
    folder.mkdir(parents=True)
    out: dict[str, list] = {"bscans": [], "localizer": []}
    parts = []
    for s in range(series):
        # file names whose natural order differs from the XML's: the XML's order must win
        names = [f"{0x3A1F0000 + 7 * s + (k * 3) % N:08X}.png" for k in range(N)]
        loc_name = f"{0x3A1E0000 + s:08X}.tif"
        out["bscans"].append(_write_images(folder, names, seed + s))
        out["localizer"].append(_write_images(folder, [loc_name], seed + 100 + s, (LOC, LOC))[0])
        urls = [f"C:\\HEYEX\\XMLDATA\\{name}" for name in names]  # real exports: Windows paths
        parts.append(_series(17 + s, laterality, urls, f"file:///C:\\HEYEX\\XMLDATA\\{loc_name}", exam))
    (folder / "3A1D0000.xml").write_text(_xml(parts, exam), encoding="utf-8")
    return out


# -- the reader ---------------------------------------------------------------------------------------


def test_reads_one_oct_volume_and_its_localizer_with_the_xml_metadata(tmp_path):
    truth = write_export(tmp_path / "export")
    items = read_items(tmp_path / "export")
    assert [item.modality for item in items] == ["oct", "fundus"]
    oct_item, localizer = items
    assert oct_item.shape == (N, H, W) and oct_item.format == "heyex-xml"
    assert np.array_equal(oct_item.pixels, np.stack(truth["bscans"][0]))  # B-scans in the XML's order
    assert localizer.shape == (LOC, LOC, 1)
    assert np.array_equal(localizer.pixels[..., 0], truth["localizer"][0])
    for item in items:
        assert item.meta.laterality == "OD"
        assert item.meta.study_date == "2021-03-04"
        assert item.meta.device == "Heidelberg Engineering Spectralis"
        assert item.meta.patient_id == PATIENT_ID  # internal: pairing groups by it
    assert oct_item.meta.acquisition_datetime == "2021-03-04T10:11:12"
    assert localizer.meta.acquisition_datetime == "2021-03-04T10:11:02"
    assert oct_item.meta.pixel_spacing_mm == pytest.approx((DISTANCE, SCALE_Y, SCALE_X), rel=1e-6)
    assert localizer.meta.pixel_spacing_mm == pytest.approx((LOC_SCALE, LOC_SCALE))
    assert np.array_equal(read_oct(tmp_path / "export").pixels, oct_item.pixels)
    assert np.array_equal(read_fundus(tmp_path / "export").pixels, localizer.pixels)
    # the XML named directly reads the same export
    assert np.array_equal(read_oct(tmp_path / "export" / "3A1D0000.xml").pixels, oct_item.pixels)
    # asked for the fundus only, the B-scans are not decoded (a damaged one does not matter then)
    sorted((tmp_path / "export").glob("*.png"))[0].write_bytes(b"\x89PNG damaged")
    fundus_only = list(iter_items(tmp_path / "export", modality="fundus"))
    assert [item.modality for item in fundus_only] == ["fundus"]
    assert np.array_equal(fundus_only[0].pixels, localizer.pixels)


def test_eyepy_reference_reads_the_same_pixels_and_geometry(tmp_path):
    eyepy = pytest.importorskip("eyepy")
    write_export(tmp_path / "export", laterality="L")
    oct_item, localizer = read_items(tmp_path / "export")
    reference = eyepy.import_heyex_xml(tmp_path / "export")
    assert np.array_equal(np.asarray(reference.data), oct_item.pixels)
    assert np.array_equal(np.asarray(reference.localizer.data), localizer.pixels[..., 0])
    assert reference.meta["laterality"] == oct_item.meta.laterality == "OS"
    assert reference.meta["scale_z"] == pytest.approx(oct_item.meta.pixel_spacing_mm[0], rel=1e-6)
    assert reference.meta["scale_y"] == pytest.approx(oct_item.meta.pixel_spacing_mm[1])
    assert reference.meta["scale_x"] == pytest.approx(oct_item.meta.pixel_spacing_mm[2])
    assert str(reference.meta["visit_date"])[:10] == oct_item.meta.study_date


def test_discovery_treats_the_folder_as_one_export(tmp_path):
    write_export(tmp_path / "data" / "export")
    _write_images(tmp_path / "data", ["photo.png"], 9, (32, 32))
    found = scan([tmp_path / "data"])
    assert not found.errors
    by_kind = {source.kind: source for source in found.sources}
    assert sorted(by_kind) == ["heyex-xml", "image"]  # no B-scan folder, no localizer as a photo
    export = by_kind["heyex-xml"]
    assert export.path == tmp_path / "data" / "export"
    assert export.modalities == ("oct", "fundus") and export.format == "heyex-xml"
    assert export.meta("oct").laterality == "OD" and export.meta("fundus").study_date == "2021-03-04"
    assert by_kind["image"].path.name == "photo.png"
    assert not any(path.suffix == ".xml" for path, _ in found.ignored)


def test_several_series_give_one_source_each_with_a_virtual_path(tmp_path):
    truth = write_export(tmp_path / "export", series=2)
    found = scan([tmp_path / "export"])
    paths = [source.path for source in found.sources]
    assert paths == [
        tmp_path / "export" / f"{SERIES_PREFIX}heyex-1",
        tmp_path / "export" / f"{SERIES_PREFIX}heyex-2",
    ]
    second = read_items(paths[1])  # a virtual path is read on its own, as for DICOM series
    assert np.array_equal(second[0].pixels, np.stack(truth["bscans"][1]))
    assert np.array_equal(second[1].pixels[..., 0], truth["localizer"][1])
    assert len(list(iter_items(tmp_path / "export"))) == 4


def test_file_names_match_case_insensitively_and_a_namespace_is_accepted(tmp_path):
    """Windows exports: the XML may say 3A1F0000.PNG for 3a1f0000.png; some roots carry an xmlns."""
    truth = write_export(tmp_path / "export")
    first = sorted((tmp_path / "export").glob("*.png"))[0]
    first.rename(first.with_name(first.name.lower()))
    xml = tmp_path / "export" / "3A1D0000.xml"
    text = xml.read_text(encoding="utf-8")
    xml.write_text(text.replace("<HEDX>", '<HEDX xmlns="http://www.heidelbergengineering.com/schema/v1">'))
    oct_item, _ = read_items(tmp_path / "export")
    assert np.array_equal(oct_item.pixels, np.stack(truth["bscans"][0]))
    assert oct_item.meta.laterality == "OD"


def test_two_xml_exports_in_one_folder_are_an_error_for_each(tmp_path):
    write_export(tmp_path / "export")
    xml = tmp_path / "export" / "3A1D0000.xml"
    (tmp_path / "export" / "3A1D0001.xml").write_bytes(xml.read_bytes())
    (tmp_path / "export" / "notes.xml").write_text("<notes>not an export</notes>")
    found = scan([tmp_path / "export"])
    assert not found.sources  # its images are not read as an anonymous B-scan folder either
    assert sorted((Path(e.path).name, e.reason) for e in found.errors) == [
        (name, "folder holds 2 HEYEX XML exports; give each its own folder")
        for name in ("3A1D0000.xml", "3A1D0001.xml")
    ]
    assert [(path.name, why) for path, why in found.ignored] == [("notes.xml", "not an image (.xml file)")]


# -- broken exports -----------------------------------------------------------------------------------


def _broken(root: Path) -> dict[str, tuple[Path, str]]:
    """Broken exports under `root` -> {case: (the path its error names, the reason's start)}."""
    cases: dict[str, tuple[Path, str]] = {}

    folder = root / "missing_bscan"
    write_export(folder)
    victim = sorted(folder.glob("*.png"))[2]
    victim.unlink()
    cases["missing"] = (
        folder / "3A1D0000.xml",
        f"B-scan or localizer file '{victim.name}' named in the XML is missing",
    )

    folder = root / "entity"
    write_export(folder)
    xml = folder / "3A1D0000.xml"
    text = xml.read_text(encoding="utf-8")
    bomb = '<!DOCTYPE HEDX [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n'
    xml.write_text(text.replace("<HEDX>", bomb + "<HEDX>").replace("<Sex>F</Sex>", "<Sex>&b;</Sex>"))
    cases["entity"] = (xml, "unsafe XML: DOCTYPE declarations are refused")

    folder = root / "escape"
    write_export(folder)
    _write_images(root, ["outside.png"], 5, (H, W))  # exists, but outside the export folder
    xml = folder / "3A1D0000.xml"
    text = xml.read_text(encoding="utf-8")
    first = re.search(r"C:\\HEYEX\\XMLDATA\\[0-9A-F]+\.png", text).group()
    xml.write_text(text.replace(first, "..\\outside.png"), encoding="utf-8")
    cases["escape"] = (xml, "an ExamURL points outside the export folder")

    folder = root / "truncated"
    write_export(folder)
    xml = folder / "3A1D0000.xml"
    xml.write_bytes(xml.read_bytes()[: xml.stat().st_size // 2])
    cases["truncated"] = (xml, "malformed XML (")

    folder = root / "no_oct"
    write_export(folder)
    xml = folder / "3A1D0000.xml"
    xml.write_text(xml.read_text(encoding="utf-8").replace("<Type>OCT</Type>", "<Type>FA</Type>"))
    cases["no_oct"] = (xml, "HEYEX XML export holds no OCT images")

    folder = root / "odd_size"
    write_export(folder)
    odd = sorted(folder.glob("*.png"))[1]
    Image.fromarray(np.zeros((H + 2, W), np.uint8)).save(odd)
    cases["odd_size"] = (folder, f"B-scans differ in size: {odd.name} has shape ({H + 2}, {W})")
    return cases


def test_broken_exports_give_one_line_errors_and_the_batch_goes_on(tmp_path):
    root = tmp_path / "batch"
    cases = _broken(root)
    good = write_export(root / "good")
    results = list(iter_items(root))
    errors = {Path(r.path): r.reason for r in results if isinstance(r, ReadError)}
    items = [r for r in results if not isinstance(r, ReadError)]
    assert errors.keys() == {path for path, _ in cases.values()}
    for name, (path, reason) in cases.items():
        assert errors[path].startswith(reason), (name, errors[path])
        assert "\n" not in errors[path]
    # the good export and the stray image next to the broken exports are still read
    by_path = {(Path(i.path), i.modality) for i in items}
    assert (root / "good", "oct") in by_path and (root / "good", "fundus") in by_path
    assert (root / "outside.png", "fundus") in by_path
    assert np.array_equal(
        next(i for i in items if Path(i.path) == root / "good").pixels, np.stack(good["bscans"][0])
    )
    # a broken export's images are not read as anonymous images (they would lose eye and date)
    assert all(Path(i.path).parent != root / "truncated" for i in items)


def test_an_oversized_xml_is_refused_before_it_is_read(tmp_path):
    write_export(tmp_path / "export")
    xml = tmp_path / "export" / "3A1D0000.xml"
    with open(xml, "r+b") as handle:  # sparse: no disk used
        handle.truncate(MAX_XML_BYTES + 1)
    found = scan([tmp_path / "export"])
    assert [e.reason.startswith("XML too large") for e in found.errors] == [True]
    assert not found.sources


# -- CLI: inspect, embed, predict, retrieve, pair -------------------------------------------------------


def retina(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "retinacli.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "RETINA_MODEL": "", "COLUMNS": "250"},
    )
    if check:
        assert result.returncode == 0, (args, result.stdout + result.stderr)
    return result


def _leaks(blobs: dict[str, str]) -> list[tuple[str, str]]:
    return [
        (where, value) for where, text in blobs.items() for value in PLANTED if value.lower() in text.lower()
    ]


def test_cli_shows_the_export_and_no_output_carries_the_patient_fields(tmp_path):
    data = tmp_path / "data"
    patient = data / f"{LAST}_{FIRST}_{PATIENT_ID}"  # real exports often sit in a folder named so
    write_export(patient / "visit_od", laterality="R", seed=1)
    write_export(patient / "visit_os", laterality="L", seed=2, exam=(2021, 3, 5))
    package = make_toy_package(tmp_path / "toy")
    store, pairs = tmp_path / "store", tmp_path / "pairs"
    results = {
        "inspect": retina("inspect", data),
        "inspect --json": retina("inspect", data, "--json"),
        "pair": retina("pair", data, "--out", pairs / "manifest.csv"),
        "pair --json": retina("pair", data, "--out", pairs / "again.csv", "--json"),
        "embed": retina("embed", data, "--model", package, "--store", store),
        "retrieve": retina("retrieve", patient / "visit_od", "--store", store, "--model", package, "--json"),
        "predict": retina("predict", "--task", "cst", "--store", store, "--model", package),
        "predict files": retina(
            "predict", data, "--task", "cst", "--model", package, "--store", store, "--json"
        ),
        "predict --csv": retina("predict", "--task", "tn", "--store", store, "--model", package, "--csv"),
    }
    shown = json.loads(results["inspect --json"].stdout)
    records = shown["items"] if isinstance(shown, dict) else shown
    od = sorted(
        (r["modality"], r["laterality"], r["study_date"], r["device"])
        for r in records
        if r["path"].endswith("visit_od")
    )
    assert od == [
        ("fundus", "OD", "2021-03-04", "Heidelberg Engineering Spectralis"),
        ("oct", "OD", "2021-03-04", "Heidelberg Engineering Spectralis"),
    ]
    with open(pairs / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["eye"], r["visit_date"], r["pair_method"]) for r in rows) == [
        ("OD", "2021-03-04", "same-file"),
        ("OS", "2021-03-05", "same-file"),
    ]
    assert all(r["oct_path"] == r["fundus_path"] and r["oct_format"] == "heyex-xml" for r in rows)
    # one patient in both exports: one pseudonym, never the XML's ID
    assert len({r["patient_id"] for r in rows}) == 1 and rows[0]["patient_id"] not in (
        PATIENT_ID,
        INTERNAL_ID,
    )
    assert re.fullmatch(r"p[0-9a-f]{12}", rows[0]["patient_id"])
    blobs = {
        f"{name} {stream}": getattr(r, stream)
        for name, r in results.items()
        for stream in ("stdout", "stderr")
    }
    for folder in (store, pairs):
        for path in folder.rglob("*"):
            if path.is_file() and path.name != "secret.key":
                blobs[str(path)] = path.read_bytes().decode("utf-8", "replace")
    # a manifest's paths stay openable unless --redact-paths (docs/reliability.md): the folder named after
    # the patient is the user's own; every other column is checked, and a redacted manifest in full
    for name in ("manifest.csv", "again.csv"):
        with open(pairs / name, newline="") as handle:
            kept = list(csv.DictReader(handle))
        assert all((pairs / row["oct_path"]).is_dir() for row in kept)
        blobs[str(pairs / name)] = json.dumps(
            [{k: v for k, v in row.items() if not k.endswith("_path")} for row in kept]
        )
    redacted = retina("pair", data, "--out", pairs / "redacted.csv", "--redact-paths")
    blobs |= {
        "pair --redact-paths stdout": redacted.stdout,
        "pair --redact-paths stderr": redacted.stderr,
        "redacted.csv": (pairs / "redacted.csv").read_text(encoding="utf-8"),
    }
    assert len(blobs) > 20
    assert any("visit_od" in text for where, text in blobs.items() if where.endswith(".parquet"))  # readable
    assert not _leaks(blobs)
    # the positive control: asked to keep identifiers, pair writes the XML's patient ID
    kept = tmp_path / "kept.csv"
    retina("pair", data, "--out", kept, "--keep-identifiers")
    assert {row["patient_id"] for row in csv.DictReader(kept.open(newline=""))} == {PATIENT_ID}


def test_cli_errors_for_broken_exports_name_the_file(tmp_path):
    root = tmp_path / "batch"
    cases = _broken(root)
    write_export(root / "good")
    named = root / f"{LAST}_{FIRST}" / "export"  # a broken export in a folder named after the patient
    write_export(named)
    (named / "3A1D0000.xml").write_bytes((named / "3A1D0000.xml").read_bytes()[:1500])
    result = retina("inspect", root, "--json")
    payload = json.loads(result.stdout)
    reported = {e["path"]: e["error"] for e in payload["errors"]}
    expected = {
        (Path("batch") / path.relative_to(root)).as_posix(): reason for path, reason in cases.values()
    }
    hidden = [path for path in reported if path not in expected]
    assert len(hidden) == 1 and re.fullmatch(r"batch/p[0-9a-f]{12}/export/3A1D0000\.xml", hidden[0])
    assert reported[hidden[0]].startswith("malformed XML (")
    del reported[hidden[0]]
    assert reported.keys() == expected.keys()
    assert all(reported[path].startswith(reason) for path, reason in expected.items())
    assert sorted(i["path"] for i in payload["items"]) == ["batch/good", "batch/good", "batch/outside.png"]
    # the terminal report: each broken export once in the table of unreadable files, nothing else
    table = retina("inspect", root)
    assert f"{len(cases) + 1} unreadable" in table.stdout + table.stderr
    assert not _leaks(
        {"inspect stdout": result.stdout + table.stdout, "inspect stderr": result.stderr + table.stderr}
    )
