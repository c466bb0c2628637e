"""Identifiers in header values and free text never reach an output (issue 13: "No header value is ever
quoted", "Free text").

The inputs plant a made-up patient's name and ids in every place a real export can hold them: PatientName,
PatientID, AccessionNumber, mistyped Rows / Columns / NumberOfFrames / SamplesPerPixel elements holding
the name as text, a PhotometricInterpretation and a SeriesInstanceUID holding it, a private tag, and the
free-text fields (StudyDescription, SeriesDescription, InstitutionName, OperatorsName,
ReferringPhysicianName, ImageComments, Manufacturer / ManufacturerModelName, StudyDate, ContentDate,
AcquisitionDateTime), plus a Heidelberg .vol whose header carries them. Every output of inspect, pair,
embed (store files, errors.csv), retrieve and predict is grepped for the planted strings, in any case;
`--keep-identifiers` is the positive control that shows the grep finds the id when it is there.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest
from fixtures_packages import make_toy_package
from pydicom.dataelem import DataElement
from test_phi import outputs_of
from test_readers_support import ramp_volume, write_bscan_series, write_op, write_opt

from retinacli.errors import ReadError
from retinacli.readers import sanitize
from retinacli.store import EmbeddingStore

NAME = "Zyxwaldo^Quixhilda"  # the planted patient's name
PATIENT_ID = "PIDQ4711X"
ACCESSION = "ACCQ9911Z"
PLANTED = ("zyxwaldo", "quixhilda", "pidq4711x", "accq9911z")  # grepped for in any case

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")


def retina(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "retinacli.cli", *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, "RETINA_MODEL": "", "COLUMNS": "250"})
    if check:
        assert result.returncode == 0, (args, result.stdout + result.stderr)
    return result


def leaks(blobs: dict[str, bytes]) -> list[tuple[str, str]]:
    """(where, planted string) for every output that holds one, in any case."""
    found = []
    for where, blob in blobs.items():
        text = blob.decode("utf-8", "replace").lower()
        found += [(where, planted) for planted in PLANTED if planted in text]
    return found


def _free_text(ds) -> None:
    """The identifiers and free-text fields a hospital export carries, all holding the planted name."""
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.StudyDescription = f"{NAME} follow-up"
    ds.SeriesDescription = NAME.replace("^", " ")
    ds.InstitutionName = f"Clinic of {NAME}"
    ds.OperatorsName = NAME
    ds.ReferringPhysicianName = NAME
    ds.ImageComments = f"patient {NAME}, id {PATIENT_ID}"
    ds.ContentDate = NAME  # a date element holding text
    ds.private_block(0x0011, "ACME CLINIC", create=True).add_new(0x01, "LO", f"{NAME} {PATIENT_ID}")


def _mistyped(path: Path, keyword: str, value: str) -> None:
    """A readable OCT whose `keyword` element is stored as text (VR LO) holding `value`."""
    ds = write_opt(path, ramp_volume(3, 16, 16), patient=PATIENT_ID, eye="OS")  # OS: not the visit's pair
    _free_text(ds)
    tag = pydicom.datadict.tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, "LO", value)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """data/visit: an OCT + fundus pair (both with every free-text plant); data/bad: mistyped elements;
    data/series: two single-frame B-scan series, one with the name as its SeriesInstanceUID."""
    data = tmp_path_factory.mktemp("headers") / "data"
    visit, bad, series = data / "visit", data / "bad", data / "series"
    for folder in (visit, bad, series):
        folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the deliberately invalid values it writes
        fundus = write_op(visit / "fundus.dcm", ramp_volume(1, 24, 24)[0], patient=PATIENT_ID, eye="OD",
                          when="20240102102900")
        _free_text(fundus)
        fundus.Manufacturer = NAME  # unrecognised: dropped
        fundus.ManufacturerModelName = PATIENT_ID
        fundus.StudyDate = NAME  # invalid: the acquisition date stands in
        fundus.save_as(visit / "fundus.dcm", enforce_file_format=True)
        oct_ds = write_opt(visit / "oct.dcm", ramp_volume(4, 16, 16), patient=PATIENT_ID, eye="OD",
                           when="20240102103000")
        _free_text(oct_ds)
        oct_ds.Manufacturer = "Heidelberg Engineering"
        oct_ds.ManufacturerModelName = f"Spectralis {NAME}"  # a known model next to a name
        oct_ds.save_as(visit / "oct.dcm", enforce_file_format=True)

        _mistyped(bad / "rows.dcm", "Rows", NAME)
        _mistyped(bad / "columns.dcm", "Columns", PATIENT_ID)
        _mistyped(bad / "frames.dcm", "NumberOfFrames", NAME)
        _mistyped(bad / "samples.dcm", "SamplesPerPixel", NAME.replace("^", " "))
        photometric = write_opt(bad / "photometric.dcm", ramp_volume(3, 16, 16), patient=PATIENT_ID, eye="OS")
        _free_text(photometric)
        photometric.PhotometricInterpretation = "ZYXWALDO_QUIXHILDA"
        photometric.save_as(bad / "photometric.dcm", enforce_file_format=True)

        write_bscan_series(series / "a", ramp_volume(3, 16, 16), patient=PATIENT_ID)
        write_bscan_series(series / "b", ramp_volume(3, 16, 16), patient=PATIENT_ID)
        for path in sorted((series / "b").glob("*.dcm")):
            ds = pydicom.dcmread(path)
            _free_text(ds)
            ds.SeriesInstanceUID = f"{NAME}.{PATIENT_ID}"
            ds.save_as(series / path.name, enforce_file_format=True)  # next to series a: two series
        shutil.rmtree(series / "b")
        for path in (series / "a").glob("*.dcm"):
            path.rename(series / f"a_{path.name}")
        (series / "a").rmdir()
    return data


def _store_rows(store: Path) -> list[dict]:
    return EmbeddingStore.open(store).metadata()


def test_no_planted_header_value_in_any_output(planted, tmp_path):
    package = make_toy_package(tmp_path / "toy")
    store, pairs = tmp_path / "store", tmp_path / "pairs"
    query = planted / "visit" / "oct.dcm"
    results = {
        "inspect": retina("inspect", planted),
        "inspect --json": retina("inspect", planted, "--json"),
        "pair": retina("pair", planted, "--out", pairs / "manifest.csv"),
        "pair --json": retina("pair", planted, "--out", pairs / "again.csv", "--json"),
        "embed": retina("embed", planted, "--model", package, "--store", store, check=False),
        "embed --json": retina("embed", planted, "--model", package, "--store", store, "--json", check=False),
        "retrieve --json": retina("retrieve", query, "--store", store, "--model", package, "--json"),
        "retrieve": retina("retrieve", query, "--store", store, "--model", package),
        "predict --json": retina("predict", "--task", "cst", "--store", store, "--model", package, "--json"),
        "predict files": retina("predict", planted / "visit", "--task", "cst", "--model", package,
                                "--store", store, "--json"),
        "predict bad": retina("predict", planted / "bad" / "rows.dcm", "--task", "cst", "--model", package,
                              "--store", store, "--json", check=False),
    }
    blobs = outputs_of(results, store, pairs)
    assert (store / "errors.csv").is_file() and (pairs / "manifest.csv").is_file()
    assert not leaks(blobs)

    # Reasons name the element, not its value (and every bad file is still reported).
    payload = json.loads(results["inspect --json"].stdout)
    reasons = {Path(e["path"]).name: e["error"] for e in payload["errors"]}
    assert reasons["rows.dcm"] == "invalid Rows in header (not a whole number)"
    assert reasons["columns.dcm"] == "invalid Columns in header (not a whole number)"
    assert reasons["frames.dcm"] == "invalid NumberOfFrames in header (not a whole number)"
    assert reasons["samples.dcm"] == "invalid SamplesPerPixel in header (not a whole number)"
    assert reasons["photometric.dcm"] == (
        "unsupported PhotometricInterpretation in header (not a DICOM defined term)")
    with open(store / "errors.csv", newline="") as fh:
        stored = {Path(row["path"]).name: row for row in csv.DictReader(fh)}
    assert {"rows.dcm", "columns.dcm", "frames.dcm", "samples.dcm"} <= set(stored)

    # Free text: dates validated and ISO, devices canonical or absent.
    items = {Path(i["path"]).name: i for i in payload["items"]}
    assert items["oct.dcm"]["study_date"] == "2024-01-02"
    assert items["oct.dcm"]["device"] == "Heidelberg Engineering Spectralis"
    assert items["fundus.dcm"]["study_date"] is None  # StudyDate held a name
    assert items["fundus.dcm"]["device"] is None  # Manufacturer held a name
    assert all(i["study_date"] is None or DATE.match(i["study_date"]) for i in payload["items"])
    rows = _store_rows(store)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["oct.dcm"]["date"] == "2024-01-02"
    assert by_name["oct.dcm"]["acquisition_datetime"] == "2024-01-02T10:30:00"
    assert by_name["fundus.dcm"]["date"] == "2024-01-02"  # from its valid AcquisitionDateTime
    assert by_name["fundus.dcm"]["device"] is None
    assert all(r["date"] is None or DATE.match(r["date"]) for r in rows)
    assert all(r["acquisition_datetime"] is None or DATETIME.match(r["acquisition_datetime"]) for r in rows)
    assert all(r["patient_identifier"] is None for r in rows)
    with open(pairs / "manifest.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    visit_pairs = [r for r in manifest if "visit" in r["oct_path"]]
    assert len(visit_pairs) == 1 and visit_pairs[0]["visit_date"] == "2024-01-02"
    assert visit_pairs[0]["oct_device"] == "Heidelberg Engineering Spectralis"
    assert visit_pairs[0]["fundus_device"] == ""
    query_date = json.loads(results["retrieve --json"].stdout)["query"]["date"]
    assert query_date == "2024-01-02"


def test_keep_identifiers_is_the_positive_control(planted, tmp_path):
    """With --keep-identifiers the raw PatientID is stored (so the grep above would have found it); the
    name and the free text still are not."""
    package = make_toy_package(tmp_path / "toy")
    store = tmp_path / "store"
    retina("embed", planted / "visit", "--model", package, "--store", store, "--keep-identifiers")
    rows = _store_rows(store)
    assert {r["patient_identifier"] for r in rows} == {PATIENT_ID}
    blobs = outputs_of({}, store)
    assert {p for _, p in leaks(blobs)} == {"pidq4711x"}


# --- the readers' own reasons ----------------------------------------------------------------------------


def test_reader_reasons_name_the_keyword_never_the_value(planted):
    from retinacli.readers import read_item

    for name, keyword in (("rows.dcm", "Rows"), ("columns.dcm", "Columns"), ("frames.dcm", "NumberOfFrames"),
                          ("samples.dcm", "SamplesPerPixel")):
        with pytest.raises(ReadError) as caught:
            read_item(planted / "bad" / name)
        assert keyword in caught.value.reason
        assert not leaks({name: str(caught.value).encode()})


def test_a_readers_unexpected_exception_is_reported_without_its_message(planted, monkeypatch):
    """A parser's exception text can quote a header value: the catch-all keeps its type only."""
    from retinacli.readers import dicom, iter_items

    def broken(path, *args, **kwargs):
        raise ValueError(f"invalid literal for int() with base 10: {NAME!r} {PATIENT_ID}")

    monkeypatch.setattr(dicom, "read_dicom", broken)
    found = [x for x in iter_items(planted / "visit") if isinstance(x, ReadError)]
    assert found and all(x.reason == "unexpected read failure (ValueError)" for x in found)


def test_scrub_takes_every_header_text_out_of_a_message(planted):
    ds = pydicom.dcmread(planted / "visit" / "oct.dcm", stop_before_pixels=True)
    message = f"decoder says: value {NAME} (ZYXWALDO) for {PATIENT_ID!r} and 'quixhilda' in 16 bytes"
    scrubbed = sanitize.scrub(message, ds)
    assert not leaks({"message": scrubbed.encode()})
    assert "16 bytes" in scrubbed  # numbers the reader may quote stay


def test_a_series_uid_holding_text_is_not_a_path(planted):
    from retinacli.readers import scan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own warning about the invalid UID it reads
        names = sorted(source.path.name for source in scan([planted / "series"]).sources)
    assert len(names) == 2 and not leaks({"paths": " ".join(names).encode()})
    assert "series=invalid-1" in names or "series=invalid-2" in names


# --- Heidelberg .vol -------------------------------------------------------------------------------------


def test_vol_header_identifiers_and_dates(tmp_path):
    """A .vol export whose header holds the planted id and visit id, and a visit date that is no date."""
    from conftest import SHARED_SAMPLES

    sample = SHARED_SAMPLES / "heidelberg_vol" / "valid.vol"
    if not sample.is_file():
        pytest.skip("the shared .vol samples are not available")
    data = tmp_path / "data"
    data.mkdir()
    raw = bytearray(sample.read_bytes())
    raw[140:164] = PATIENT_ID.encode().ljust(24, b"\x00")  # PatientID
    raw[176:200] = NAME.encode()[:24].ljust(24, b"\x00")  # VisitID
    raw[200:208] = struct.pack("<d", -5.0)  # VisitDate: not a date
    (data / "exam.vol").write_bytes(bytes(raw))
    results = {
        "inspect --json": retina("inspect", data, "--json"),
        "pair --json": retina("pair", data, "--out", tmp_path / "pairs" / "m.csv", "--json"),
    }
    assert not leaks(outputs_of(results, tmp_path / "pairs"))
    items = json.loads(results["inspect --json"].stdout)["items"]
    assert {i["study_date"] for i in items} == {"2011-11-09"}  # the exam time stands in
    assert {i["device"] for i in items} == {"Heidelberg Engineering Spectralis"}
    control = retina("pair", data, "--out", tmp_path / "kept" / "m.csv", "--keep-identifiers")
    assert leaks(outputs_of({"pair": control}, tmp_path / "kept")) != []  # the grep sees the id when kept


# --- sanitize.py -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("20240102", "2024-01-02"), ("2024.01.02", "2024-01-02"), ("2024-01-02", "2024-01-02"),
    (" 20240102\x00", "2024-01-02"), ("20240230", None), ("00010101", None), ("99991231", None),
    (NAME, None), ("", None), (None, None), ("2024010", None), ("20240102103000", None),
])  # fmt: skip
def test_iso_date(value, expected):
    assert sanitize.iso_date(value) == expected


@pytest.mark.parametrize(("date", "time", "expected"), [
    ("20240102", "103000", "2024-01-02T10:30:00"), ("20240102", "1030", "2024-01-02T10:30:00"),
    ("20240102", "103000.123456", "2024-01-02T10:30:00"), ("20240102", None, "2024-01-02T00:00:00"),
    ("20240102", NAME, "2024-01-02T00:00:00"), ("20240102", "256100", "2024-01-02T00:00:00"),
    (NAME, "103000", None),
])  # fmt: skip
def test_iso_datetime(date, time, expected):
    assert sanitize.iso_datetime(date, time) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("20240102103000", "2024-01-02T10:30:00"), ("20240102103000.5+0100", "2024-01-02T10:30:00"),
    ("20240102", "2024-01-02T00:00:00"), (NAME, None), ("2024010210300X", None), ("20241340", None),
])  # fmt: skip
def test_iso_dicom_datetime(value, expected):
    assert sanitize.iso_dicom_datetime(value) == expected


@pytest.mark.parametrize(("maker", "model", "expected"), [
    ("Heidelberg Engineering", "Spectralis", "Heidelberg Engineering Spectralis"),
    ("HEIDELBERG ENGINEERING", f"SPECTRALIS {NAME}", "Heidelberg Engineering Spectralis"),
    ("Carl Zeiss Meditec", "CIRRUS HD-OCT 5000", "Carl Zeiss Meditec Cirrus"),
    (None, "Cirrus", "Carl Zeiss Meditec Cirrus"),
    ("TOPCON", "3D OCT-2000", "Topcon"), ("Optos plc", "Daytona", "Optos Daytona"),
    ("Canon", None, "Canon"), ("NIDEK", "RS-3000", "Nidek"), ("Optovue", "RTVue-XR", "Optovue RTVue"),
    (NAME, PATIENT_ID, None), ("Dr. Smith's clinic", "Model X", None), (None, None, None),
    ("Heidelberg Engineering", "Cirrus", "Heidelberg Engineering"),  # a model of another vendor: vendor only
])  # fmt: skip
def test_device_names_come_from_a_fixed_table(maker, model, expected):
    assert sanitize.device_name(maker, model) == expected


def test_the_synthetic_cohorts_devices_are_recognised():
    """The table keeps the synthetic cohort's own names (retinacli.synth) recognisable."""
    from retinacli.synth.cohort import OCT_DEVICE
    from retinacli.synth.dicom_writer import MANUFACTURER
    from retinacli.synth.fundus import DEVICES

    assert MANUFACTURER == sanitize.SYNTH_VENDOR
    assert set(sanitize.SYNTH_MODELS) == {OCT_DEVICE, *DEVICES.values()}
    for model in sanitize.SYNTH_MODELS:
        assert sanitize.device_name(MANUFACTURER, model) == f"{MANUFACTURER} {model}"
    assert sanitize.device_name(MANUFACTURER, NAME) == MANUFACTURER


def test_date_of_prefers_the_study_date():
    assert sanitize.date_of("2024-01-02", "2023-05-06T10:00:00") == "2024-01-02"
    assert sanitize.date_of(None, "2023-05-06T10:00:00") == "2023-05-06"
    assert sanitize.date_of(None, None) is None
    assert sanitize.date_of("20240102", None) == "2024-01-02"  # a 0.1.0-style value still reads


def test_dates_read_back_from_a_store_are_iso_whatever_the_store_version():
    """retrieve / predict report the store's `date`: a 0.1.0 row (YYYYMMDD) reads as YYYY-MM-DD too, and a
    value that is no date reads as none."""
    from retinacli.retrieval import Hit

    cases = (("20240102", "2024-01-02"), ("2024-01-02", "2024-01-02"), (None, None), (NAME, None))
    for stored, shown in cases:
        assert Hit(1, 0.5, {"id": "i1", "date": stored}).to_dict()["date"] == shown


@pytest.mark.parametrize(("value", "expected"), [
    ("R", "OD"), ("od", "OD"), ("Right", "OD"), ("L", "OS"), ("OS\x00", "OS"), ("left", "OS"),
    (NAME, None), ("B", None), ("", None), (None, None),
])  # fmt: skip
def test_laterality_comes_from_a_fixed_set(value, expected):
    assert sanitize.normalise_laterality(value) == expected
