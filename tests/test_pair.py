"""`retina pair`: recover OCT-fundus pairs from exports, pseudonymise, join labels, report the rest."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_readers_support import ramp_volume, write_dicom_cohort, write_op, write_opt
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.pairing import MANIFEST_COLUMNS, pair_folders
from retinacli.privacy import SECRET_FILE
from retinacli.readers import read_fundus, read_oct

runner = CliRunner()


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


def _pairs(manifest: Path) -> set[tuple[str, str]]:
    base = manifest.parent
    return {
        (str((base / r["oct_path"]).resolve()), str((base / r["fundus_path"]).resolve()))
        for r in _rows(manifest)
    }


def _truth_pairs(truth) -> set[tuple[str, str]]:
    return {(str(Path(t["oct_path"]).resolve()), str(Path(t["fundus_path"]).resolve())) for t in truth}


def _pair_json(*args):
    result = runner.invoke(app, ["pair", *map(str, args), "--json"])
    return result, json.loads(result.stdout) if result.stdout.strip() else None


def test_pairs_by_localizer_reference(tmp_path):
    truth = write_dicom_cohort(tmp_path / "export", patients=3, visits=2)
    manifest = tmp_path / "out" / "manifest.csv"
    result, payload = _pair_json(tmp_path / "export", "--out", manifest)
    assert result.exit_code == 0, result.output
    assert payload["pairs"] == 12 and payload["by_method"] == {"reference": 12}
    assert payload["unpaired"] == [] and payload["errors"] == []
    assert _pairs(manifest) == _truth_pairs(truth)
    rows = _rows(manifest)
    assert list(rows[0])[: len(MANIFEST_COLUMNS)] == list(MANIFEST_COLUMNS)
    # pseudonymous ids: one per patient, stable, keyed by the secret beside the manifest
    assert (manifest.parent / SECRET_FILE).is_file()
    ids = {r["patient_id"] for r in rows}
    assert len(ids) == 3 and all(i.startswith("p") and "SYN" not in i for i in ids)
    assert "SYN0000" not in manifest.read_text() and "SYN0000" not in result.stdout
    # visit = index of the visit date per patient + eye; eyes from DICOM laterality
    by_truth = {(str(Path(t["oct_path"]).resolve())): t for t in truth}
    for row in rows:
        expected = by_truth[str((manifest.parent / row["oct_path"]).resolve())]
        assert row["eye"] == expected["eye"] and int(row["visit"]) == expected["visit"]
        assert row["visit_date"].replace("-", "") == expected["date"]
        assert row["oct_path"].startswith("../export/")  # relative to the manifest's folder
    # the manifest's paths read back with the readers
    assert read_oct(manifest.parent / rows[0]["oct_path"]).shape == (4, 32, 32)
    assert read_fundus(manifest.parent / rows[0]["fundus_path"]).shape == (48, 48, 3)
    # a second run keeps the same pseudonyms (same secret)
    runner.invoke(app, ["pair", str(tmp_path / "export"), "--out", str(manifest)])
    assert {r["patient_id"] for r in _rows(manifest)} == ids


def test_fallback_by_patient_eye_and_time(tmp_path):
    truth = write_dicom_cohort(tmp_path / "export", patients=2, visits=3, reference=False)
    manifest = tmp_path / "manifest.csv"
    result, payload = _pair_json(tmp_path / "export", "--out", manifest)
    assert result.exit_code == 0
    assert payload["by_method"] == {"time": 12}
    assert _pairs(manifest) == _truth_pairs(truth)
    assert {float(r["hours_apart"]) for r in _rows(manifest)} == {0.75 / 60}


def test_window_and_unpaired_reasons(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    write_op(export / "f.dcm", np.zeros((16, 16, 3), np.uint8), "SYN000001", "OD", "20240101100000")
    write_opt(export / "o_same_day.dcm", ramp_volume(2, 16, 16), "SYN000001", "OD", "20240101110000")
    write_opt(export / "o_second.dcm", ramp_volume(2, 16, 16), "SYN000001", "OD", "20240101150000")
    write_opt(export / "o_other_eye.dcm", ramp_volume(2, 16, 16), "SYN000001", "OS", "20240101110000")
    write_op(export / "f_late.dcm", np.zeros((16, 16, 3), np.uint8), "SYN000001", "OS", "20240105100000")
    result, payload = _pair_json(export, "--out", tmp_path / "m.csv", "--window-hours", "24")
    assert result.exit_code == 0 and payload["pairs"] == 1
    rows = _rows(tmp_path / "m.csv")
    assert rows[0]["oct_path"].endswith("o_same_day.dcm") and rows[0]["fundus_path"].endswith("f.dcm")
    reasons = {Path(u["path"]).name: u["reason"] for u in payload["unpaired"]}
    assert reasons == {
        "o_second.dcm": "the fundus images within 24 h were paired with closer OCT scans",
        "o_other_eye.dcm": "no fundus image of the same patient and eye within 24 h",
        "f_late.dcm": "no OCT volume of the same patient and eye within 24 h",
    }
    # a wider window pairs the left eye across 4 days
    result, payload = _pair_json(export, "--out", tmp_path / "m.csv", "--window-hours", "120")
    assert payload["pairs"] == 2


def test_labels_join_by_patient_eye_and_date(tmp_path):
    truth = write_dicom_cohort(tmp_path / "export", patients=2, visits=2)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "eye", "date", "cst_um", "bcva_letters", "bcva_label", "tn_label"])
        for index, t in enumerate(truth):
            date = f"{t['date'][:4]}-{t['date'][4:6]}-{t['date'][6:]}"
            labels_row = [250 + index, 60 + index, index % 2, (index + 1) % 2]
            writer.writerow([t["patient"], t["eye"], date, *labels_row])
        writer.writerow(["SYN999999", "OD", "2024-01-01", 300, 70, 1, 0])  # matches nothing
    manifest = tmp_path / "manifest.csv"
    result, payload = _pair_json(tmp_path / "export", "--out", manifest, "--labels", labels)
    assert result.exit_code == 0
    assert payload["labels_rows"] == len(truth) + 1 and payload["labels_matched"] == len(truth)
    rows = {str((manifest.parent / r["oct_path"]).resolve()): r for r in _rows(manifest)}
    for index, t in enumerate(truth):
        row = rows[str(Path(t["oct_path"]).resolve())]
        assert (row["cst_um"], row["bcva_letters"]) == (str(250 + index), str(60 + index))
        assert (row["bcva_label"], row["tn_label"]) == (str(index % 2), str((index + 1) % 2))


def test_bad_labels_csv_is_a_usage_error(tmp_path):
    write_dicom_cohort(tmp_path / "export", patients=1, visits=1)
    (tmp_path / "labels.csv").write_text("id,value\n1,2\n")
    result = runner.invoke(app, ["pair", str(tmp_path / "export"), "--out", str(tmp_path / "m.csv"),
                                 "--labels", str(tmp_path / "labels.csv")])  # fmt: skip
    assert result.exit_code == 2 and not (tmp_path / "m.csv").exists()
    missing = runner.invoke(app, ["pair", str(tmp_path / "export"), "--out", str(tmp_path / "m.csv"),
                                  "--labels", str(tmp_path / "nope.csv")])  # fmt: skip
    assert missing.exit_code == 2
    zero = runner.invoke(app, ["pair", str(tmp_path), "-o", str(tmp_path / "m.csv"), "--window-hours", "0"])
    assert zero.exit_code == 2


def test_keep_identifiers(tmp_path):
    write_dicom_cohort(tmp_path / "export", patients=2, visits=1)
    manifest = tmp_path / "manifest.csv"
    args = ["pair", str(tmp_path / "export"), "--out", str(manifest), "--keep-identifiers"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    assert {r["patient_id"] for r in _rows(manifest)} == {"SYN000001", "SYN000002"}


def test_nothing_to_pair_exits_1(tmp_path):
    write_opt(tmp_path / "lonely.dcm", ramp_volume(2, 16, 16))
    result, payload = _pair_json(tmp_path, "--out", tmp_path / "m.csv")
    assert result.exit_code == 1 and payload["pairs"] == 0 and payload["manifest"] is None
    assert not (tmp_path / "m.csv").exists()
    assert payload["unpaired"][0]["modality"] == "oct"


def test_vol_files_pair_with_their_own_slo(shared_samples, tmp_path):
    manifest = tmp_path / "manifest.csv"
    report = pair_folders([shared_samples / "heidelberg_vol"], manifest)
    assert report.by_method() == {"same-file": 2}
    rows = _rows(manifest)
    assert all(r["oct_path"] == r["fundus_path"] and r["eye"] == "OD" for r in rows)
    assert "01234" not in manifest.read_text()


def test_tiny_cohort_pairs_recovered(request, tmp_path):
    """The synthetic cohort with its manifest removed: every original (oct, fundus) pair comes back,
    and labels joined by PatientID / eye / date equal the original manifest's labels."""
    try:
        cohort = Path(request.getfixturevalue("tiny_cohort"))
    except pytest.FixtureLookupError:
        pytest.skip("fixture tiny_cohort not available yet")
    original_rows = _rows(cohort / "manifest.csv")
    original = _pairs(cohort / "manifest.csv")
    copy = tmp_path / "cohort"
    shutil.copytree(cohort, copy)
    (copy / "manifest.csv").unlink()
    old, new = str(cohort.resolve()), str(copy.resolve())

    # labels keyed the way a clinic has them: the PatientID in the files, eye, visit date
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "eye", "date", "cst_um", "bcva_letters", "bcva_label", "tn_label"])
        for row in original_rows:
            header = pydicom.dcmread(cohort / row["oct_path"], stop_before_pixels=True)
            writer.writerow([header.PatientID, row["eye"], row["visit_date"], row["cst_um"],
                             row["bcva_letters"], row["bcva_label"], row["tn_label"]])  # fmt: skip

    manifest = copy / "paired.csv"
    result, payload = _pair_json(copy, "--out", manifest, "--labels", labels)
    assert result.exit_code == 0, result.output
    expected = {(o.replace(old, new), f.replace(old, new)) for o, f in original}
    assert _pairs(manifest) == expected
    assert payload["by_method"] == {"reference": len(expected)} and payload["unpaired"] == []
    assert payload["labels_matched"] == len(original_rows)
    by_oct = {str((cohort / r["oct_path"]).resolve()).replace(old, new): r for r in original_rows}
    for row in _rows(manifest):
        truth = by_oct[str((manifest.parent / row["oct_path"]).resolve())]
        for column in ("eye", "visit", "cst_um", "bcva_letters", "bcva_label", "tn_label"):
            assert row[column] == truth[column], column
    assert "SYNTH^" not in manifest.read_text() and "SYN0" not in manifest.read_text()


def test_tiny_cohort_without_localizer_references(request, tmp_path):
    """Fallback: with every OCT's localizer reference deleted, patient + eye + time recovers the pairs."""
    try:
        cohort = Path(request.getfixturevalue("tiny_cohort"))
    except pytest.FixtureLookupError:
        pytest.skip("fixture tiny_cohort not available yet")
    original_rows = _rows(cohort / "manifest.csv")
    copy = tmp_path / "cohort"
    shutil.copytree(cohort, copy, ignore=shutil.ignore_patterns("manifest.csv"))
    for row in original_rows:
        path = copy / row["oct_path"]
        ds = pydicom.dcmread(path)
        for keyword in ("ReferencedImageSequence", "OphthalmicFrameLocationSequence"):
            if keyword in ds:
                delattr(ds, keyword)
        for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
            if "OphthalmicFrameLocationSequence" in frame:
                del frame.OphthalmicFrameLocationSequence
        ds.save_as(path)
    manifest = copy / "paired.csv"
    result, payload = _pair_json(copy, "--out", manifest)
    assert result.exit_code == 0, result.output
    expected = {(str((copy / r["oct_path"]).resolve()), str((copy / r["fundus_path"]).resolve()))
                for r in original_rows}  # fmt: skip
    assert _pairs(manifest) == expected
    assert payload["by_method"] == {"time": len(expected)}
