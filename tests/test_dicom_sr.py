"""`retina predict --dicom-sr OUTDIR` (issue 18, "DICOM Structured Report (opt-in)").

One TID 1500 measurement report per DICOM input, written with highdicom: every file passes dciodvfy
without errors and reads back with highdicom to the prediction's value, units, algorithm and source
instance. It copies the source's Patient and Study modules (the one output carrying identifiers), so it
is written only with the option; non-DICOM inputs are listed as "no DICOM source to reference".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_cli import run_cli as run
from fixtures_packages import make_toy_package

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
pytest.importorskip("onnxruntime")

DCIODVFY = Path(sys.executable).parent / "dciodvfy"
ALGORITHM_NAME, ALGORITHM_VERSION = "111001", "111003"  # DCM codes of TID 4019


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two synthetic patients, one visit: an OCT and a fundus DICOM each."""
    from retinacli.synth import generate_cohort

    out = tmp_path_factory.mktemp("sr_cohort") / "cohort"
    generate_cohort(out, formats=("dicom",), patients=2, visits=1, seed=0, oct_shape=(8, 64, 64),
                    fundus_size=64, workers=1)
    return out / "dicom"


@pytest.fixture
def env(private_home, monkeypatch):
    monkeypatch.setenv("RETINA_STORE", str(private_home / "store"))
    return private_home


def _sources(cohort: Path) -> dict[str, Path]:
    """SOPInstanceUID -> file, of every DICOM of the cohort."""
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in cohort.rglob("*.dcm")}


def _text(items, code: str) -> str:
    """The text of the one content item named by DCM `code` under `items` (at any depth)."""
    found = []

    def walk(sequence):
        for item in sequence:
            if item.ConceptNameCodeSequence[0].CodeValue == code:
                found.append(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(items)
    (text,) = found
    return text


def _check_reports(payload: dict, outdir: Path, cohort: Path, package: Path, value_key: str, unit: str):
    """Every SR in `outdir` is valid (dciodvfy), and holds one prediction of `payload` exactly."""
    descriptor = json.loads((package / "retina.json").read_text())
    sources = _sources(cohort)
    records = {p["id"]: p for p in payload["predictions"]}
    written = payload["dicom_sr"]["written"]
    files = sorted(outdir.iterdir())
    assert len(files) == len(written) == len(records) > 0
    assert sorted(w["id"] for w in written) == sorted(records)
    for entry in written:
        path = outdir / entry["file"]
        check = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True)
        lines = (check.stdout + check.stderr).splitlines()
        assert not [ln for ln in lines if ln.startswith("Error")], lines
        sr = hd.sr.srread(path)
        assert path.name == f"{sr.SOPInstanceUID}.dcm"
        record = records[entry["id"]]
        (group,) = sr.content.get_image_measurement_groups()
        (measurement,) = group.get_measurements()
        assert measurement.name.value == payload["task"]
        assert measurement.value == pytest.approx(record[value_key], rel=1e-9, abs=1e-12)
        assert (measurement.unit.value, measurement.unit.scheme_designator) == (unit, "UCUM")
        assert _text(group, ALGORITHM_NAME) == descriptor["name"]
        assert _text(group, ALGORITHM_VERSION) == descriptor["version"]
        (observer,) = sr.content.get_observer_contexts()
        device = {i.ConceptNameCodeSequence[0].CodeMeaning: getattr(i, "TextValue", None) for i in observer}
        assert device["Device Observer Model Name"] == payload["model"]
        (image,) = measurement.referenced_images
        source_file = sources[image.referenced_sop_instance_uid]
        assert source_file.as_posix().endswith(record["path"])  # the prediction's own source
        source = pydicom.dcmread(source_file, stop_before_pixels=True)
        assert image.referenced_sop_class_uid == source.SOPClassUID
        # filed like the source: its Patient and Study modules (the identifiers this output carries)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
            assert sr[key].value == source[key].value
        assert str(source.PatientName) not in path.name and source.PatientID not in path.name


def test_predict_on_files_writes_one_valid_sr_per_dicom_input(env, cohort):
    package = make_toy_package(env / "toy")
    code, out, err = run("predict", cohort, "--task", "cst", "--model", package, "--dicom-sr", env / "sr",
                         "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert len(payload["predictions"]) == 2 and payload["dicom_sr"]["skipped"] == []
    _check_reports(payload, env / "sr", cohort, package, "value", "um")
    assert "wrote 2 DICOM SR file(s)" in err


def test_predict_from_store_binary_task(env, cohort):
    package = make_toy_package(env / "toy")
    code, _out, err = run("embed", cohort, "--model", package, "--store", env / "store")
    assert code == 0, err
    code, out, err = run("predict", "--task", "tn", "--store", env / "store", "--redact-paths",
                         "--modality", "fundus", "--dicom-sr", env / "sr", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert len(payload["predictions"]) == 2
    assert all(0 <= p["probability"] <= 1 for p in payload["predictions"])
    # the sources are found through the store's rows, though the printed paths are redacted
    code, out, err = run("predict", "--task", "tn", "--store", env / "store", "--modality", "fundus",
                         "--json")
    assert code == 0, err
    stored = {p["id"]: p["path"] for p in json.loads(out)["predictions"]}
    for p in payload["predictions"]:
        assert p["path"] != stored[p["id"]]
        p["path"] = stored[p["id"]]
    _check_reports(payload, env / "sr", cohort, package, "probability", "1")


def test_png_inputs_get_no_sr(env):
    from PIL import Image

    data = env / "png"
    data.mkdir()
    Image.new("RGB", (24, 20), (120, 60, 30)).save(data / "fundus.png")
    package = make_toy_package(env / "toy")
    code, out, err = run("predict", data, "--task", "tn", "--modality", "fundus", "--model", package,
                         "--dicom-sr", env / "sr", "--json")
    assert code == 0, err
    result = json.loads(out)["dicom_sr"]
    assert result["written"] == []
    assert result["skipped"] == [{"id": result["skipped"][0]["id"], "path": "png/fundus.png",
                                  "reason": "no DICOM source to reference"}]
    assert "no DICOM SR: png/fundus.png: no DICOM source to reference" in err
    assert list((env / "sr").iterdir()) == []


def test_without_the_option_no_dicom_is_written(env, cohort):
    package = make_toy_package(env / "toy")
    assert run("embed", cohort, "--model", package, "--store", env / "store")[0] == 0
    for args in (["--store", env / "store"], [cohort, "--model", package]):
        code, out, err = run("predict", "--task", "cst", *args, "--json", "--html", env / "r.html")
        assert code == 0, err
        assert "dicom_sr" not in json.loads(out)
    assert [p for p in env.rglob("*") if p.suffix == ".dcm" or p.name.startswith("DICOMDIR")] == []


def test_without_highdicom_the_option_exits_2(env, cohort, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if the extra were not installed
    code, _out, err = run("predict", cohort, "--task", "cst", "--model", env / "nowhere", "--dicom-sr",
                          env / "sr")
    assert code == 2
    assert "needs the 'retina[sr]' extra" in err
    assert not (env / "sr").exists()


def test_highdicom_is_imported_only_with_the_option():
    script = ("import sys\nfrom retinacli.commands import predict\nfrom retinacli.cli import app\n"
              "assert 'highdicom' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unlocatable_store_sources_are_listed_and_files_are_always_found(env, cohort):
    """From a store: a deleted source and one whose folder (named after the PatientID) was stored as a
    pseudonym get no SR and are listed with the reason; predicting on the files finds them."""
    import shutil

    src = env / "src"
    shutil.copytree(cohort, src)
    first, second = sorted(p for p in src.iterdir() if p.is_dir())
    patient_id = pydicom.dcmread(next(first.glob("*.dcm")), stop_before_pixels=True).PatientID
    renamed = first.rename(src / patient_id)
    package = make_toy_package(env / "toy")
    assert run("embed", src, "--model", package, "--store", env / "store")[0] == 0
    (second / "OS_v00_fundus.dcm").unlink()
    code, out, err = run("predict", "--task", "tn", "--store", env / "store", "--modality", "fundus",
                         "--dicom-sr", env / "sr", "--json")
    assert code == 0, err
    result = json.loads(out)["dicom_sr"]
    assert result["written"] == [] and list((env / "sr").iterdir()) == []
    assert sorted(s["reason"] for s in result["skipped"]) == [
        "path redacted: the source file cannot be located", "source file not found (moved or deleted)"]
    assert patient_id not in out + err
    code, out, err = run("predict", renamed, "--task", "tn", "--modality", "fundus", "--model", package,
                         "--dicom-sr", env / "sr2", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert len(payload["dicom_sr"]["written"]) == 1 and patient_id not in out + err
    (path,) = (env / "sr2").iterdir()
    sr = hd.sr.srread(path)
    source = pydicom.dcmread(renamed / "OS_v00_fundus.dcm", stop_before_pixels=True)
    (group,) = sr.content.get_image_measurement_groups()
    (measurement,) = group.get_measurements()
    assert measurement.referenced_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    assert measurement.value == pytest.approx(payload["predictions"][0]["probability"], rel=1e-9)


def test_outdir_naming_a_file_is_a_usage_error(env, cohort):
    (env / "taken").write_text("x")
    code, _out, err = run("predict", cohort, "--task", "cst", "--model", env / "nowhere", "--dicom-sr",
                          env / "taken")
    assert code == 2 and "--dicom-sr names a file" in err
