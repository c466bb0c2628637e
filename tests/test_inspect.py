"""`retina inspect`: items and errors, exit codes, no identifiers, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_readers_support import ramp_volume, write_bscan_series, write_op, write_opt, write_png
from typer.testing import CliRunner

from retinacli.cli import app

runner = CliRunner()


def _inspect_json(*paths):
    result = runner.invoke(app, ["inspect", *map(str, paths), "--json"])
    return result, json.loads(result.stdout) if result.stdout.strip() else None


def _cohort_or_skip(request, name):
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.skip(f"fixture {name} not available yet")


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_opt(folder / "oct.dcm", ramp_volume(4, 32, 32), "SYN000042", "OD", localizer_uid="1.2.3")
    write_op(folder / "fundus.dcm", np.zeros((20, 24, 3), np.uint8), "SYN000042", "OD")
    write_bscan_series(folder / "series", ramp_volume(3, 16, 16), patient="SYN000043")
    write_png(folder / "photo.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    png = (folder / "photo.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "zero.dcm").write_bytes(b"")
    (folder / "renamed.dcm").write_text("just a text file\n" * 10)
    (folder / "readme.txt").write_text("ignored")
    return folder


def test_mixed_folder_lists_good_items_and_bad_files(mixed_folder):
    result, payload = _inspect_json(mixed_folder)
    assert result.exit_code == 0
    # paths are relative to the folder holding the PATH given (so they start with its name), root r0
    items = {item["path"].removeprefix("mixed/"): item for item in payload["items"]}
    assert set(items) == {"oct.dcm", "fundus.dcm", "series", "photo.png"}
    assert items["oct.dcm"] == {
        "root": "r0",
        "path": "mixed/oct.dcm",
        "modality": "oct",
        "format": "dicom",
        "shape": [4, 32, 32],
        "dtype": "uint8",
        "laterality": "OD",
        "study_date": "2024-01-02",
        "device": "Carl Zeiss Meditec Cirrus",
        "pixel_spacing_mm": [0.12, 0.0039, 0.0117],
    }
    assert items["series"]["shape"] == [3, 16, 16] and items["series"]["modality"] == "oct"
    assert items["photo.png"]["modality"] == "fundus" and items["photo.png"]["shape"] == [64, 64, 3]
    errors = {e["path"].removeprefix("mixed/"): e["error"] for e in payload["errors"]}
    assert errors == {
        "zero.dcm": "empty file (0 bytes)",
        "renamed.dcm": "not a DICOM file",
        "truncated.png": "image truncated (file ends before the image data does)",
    }
    assert payload["ignored"] == 1
    assert "SYN0000" not in result.stdout and "SYNTH^" not in result.stdout


def test_table_output_has_no_identifiers(mixed_folder):
    result = runner.invoke(app, ["inspect", str(mixed_folder)])
    assert result.exit_code == 0
    text = result.stdout + (result.stderr or "")
    assert "4 item(s)" in text and "3 unreadable" in text and "ignored 1" in text
    assert "SYN0000" not in text and "SYNTH" not in text and "19500101" not in text


def test_nothing_readable_exits_1(tmp_path):
    (tmp_path / "zero.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    result, payload = _inspect_json(tmp_path)
    assert result.exit_code == 1
    assert payload["items"] == [] and payload["errors"][0]["error"] == "empty file (0 bytes)"
    assert runner.invoke(app, ["inspect", str(tmp_path / "missing")]).exit_code == 2  # missing path


def test_usage_error_exits_2():
    assert runner.invoke(app, ["inspect"]).exit_code == 2
    assert runner.invoke(app, ["inspect", ".", "--bogus"]).exit_code == 2


def test_shared_vol_samples(shared_samples):
    result, payload = _inspect_json(shared_samples / "heidelberg_vol")
    assert result.exit_code == 0 and payload["errors"] == []
    seen = sorted((i["path"].rsplit("/", 1)[-1], i["modality"], tuple(i["shape"])) for i in payload["items"])
    assert seen == [
        ("Willis_B_716_0.vol", "fundus", (768, 768, 1)),
        ("Willis_B_716_0.vol", "oct", (1, 496, 768)),
        ("valid.vol", "fundus", (768, 768, 1)),
        ("valid.vol", "oct", (1, 496, 768)),
    ]
    assert {i["laterality"] for i in payload["items"]} == {"OD"}
    assert "01234" not in result.stdout  # the sample's patient ID


def _manifest_paths(cohort):
    import csv

    with open(cohort / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {
        **{str((cohort / r["oct_path"]).resolve()): "oct" for r in rows},
        **{str((cohort / r["fundus_path"]).resolve()): "fundus" for r in rows},
    }


@pytest.mark.parametrize("fixture", ["tiny_cohort", "tiny_cohort_png"])
def test_tiny_cohort_reads_every_file(request, fixture):
    cohort = _cohort_or_skip(request, fixture)
    result, payload = _inspect_json(cohort)
    assert result.exit_code == 0 and payload["errors"] == []
    seen = {str((cohort.parent / i["path"]).resolve()): i["modality"] for i in payload["items"]}
    assert seen == _manifest_paths(cohort)  # every OCT and fundus of the manifest, nothing else
    oct_shapes = {tuple(i["shape"]) for i in payload["items"] if i["modality"] == "oct"}
    assert oct_shapes == {(8, 64, 64)}
    assert "SYN0" not in result.stdout and "SYNTH^" not in result.stdout


def test_inspect_does_not_import_torch(mixed_folder):
    code = (
        "import sys; from typer.testing import CliRunner; from retinacli.cli import app; "
        f"r = CliRunner().invoke(app, ['inspect', {str(mixed_folder)!r}, '--json']); "
        "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
