"""Lifecycle: `retina store remove --patient` (consent withdrawn), `retina store prune` (sources changed
or gone) and `retina models remove`, with the real readers, a toy package and a tiny DICOM cohort."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_packages import make_toy_package
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.store import EmbeddingStore

pytest.importorskip("onnx")
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def store_bytes(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def rows_by_id(store: Path) -> dict[str, tuple[np.ndarray, dict]]:
    opened = EmbeddingStore.open(store)
    vectors, meta = opened.vectors(), opened.metadata()
    return {row["id"]: (vectors[i], row) for i, row in enumerate(meta)}


@pytest.fixture
def built(tiny_cohort, tmp_path, isolated_cli):
    """A copy of the tiny cohort embedded with a toy package into a fresh store (each test its own)."""
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    package = make_toy_package(tmp_path / "toy")
    store = tmp_path / "store"
    result = cli("embed", cohort, "--model", package, "--store", store)
    assert result.exit_code == 0, result.output
    return package, store, cohort


def test_remove_patient_drops_exactly_their_rows(built):
    package, store, _cohort = built
    before = rows_by_id(store)
    patients = sorted({row["patient"] for _v, row in before.values()})
    assert len(patients) == 6 and len(before) == 32
    patient = patients[0]
    gone = {i for i, (_v, row) in before.items() if row["patient"] == patient}
    assert len(gone) == 4 or len(gone) == 8
    # errors.csv names the patient by pseudonym in a redacted path: that line goes too
    with open(store / "errors.csv", "a", encoding="utf-8") as fh:
        fh.write(f"cohort/dicom/{patient}/bad.dcm,not a DICOM file\nother/x.dcm,truncated\n")

    result = cli("store", "remove", "--patient", patient, "--store", store, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows_removed"] == len(gone) and summary["rows_after"] == 32 - len(gone)
    assert {r["id"] for r in summary["removed"]} == gone
    assert summary["errors_rows_removed"] == 1
    after = rows_by_id(store)
    assert set(after) == set(before) - gone
    # vectors stay aligned with their metadata rows
    for item, (vector, row) in after.items():
        np.testing.assert_array_equal(vector, before[item][0])
        assert row == before[item][1]
    assert patient not in (store / "errors.csv").read_text()
    assert "other/x.dcm" in (store / "errors.csv").read_text()
    assert cli("store", "verify", "--store", store).exit_code == 0
    # only listed shard files remain (the old ones were deleted after store.json changed)
    listed = {s.embeddings.name for s in EmbeddingStore.open(store).shards}
    assert {p.name for p in (store / "embeddings").iterdir()} == listed
    # retrieval works and never returns a removed item
    query = next(iter(after))
    found = cli("retrieve", query, "--store", store, "--model", package, "-k", "50", "--json")
    assert found.exit_code == 0, found.output
    ids = {r["id"] for r in json.loads(found.stdout)["results"]}
    assert ids and not ids & gone


def test_remove_unknown_patient_changes_nothing(built):
    _package, store, _cohort = built
    snapshot = store_bytes(store)
    result = cli("store", "remove", "--patient", "p000000000000", "--store", store)
    assert result.exit_code == 1
    assert "no rows for this patient" in result.output
    assert store_bytes(store) == snapshot


def test_remove_dry_run_changes_nothing(built):
    _package, store, _cohort = built
    patient = EmbeddingStore.open(store).metadata(["patient"])[0]["patient"]
    snapshot = store_bytes(store)
    result = cli("store", "remove", "--patient", patient, "--store", store, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dry_run"] and summary["rows_removed"] > 0
    assert store_bytes(store) == snapshot
    text = cli("store", "remove", "--patient", patient, "--store", store, "--dry-run")
    assert text.stdout.count("would remove i") == summary["rows_removed"]
    assert store_bytes(store) == snapshot


def test_remove_updates_the_ann_index(built):
    pytest.importorskip("faiss")
    package, store, _cohort = built
    assert cli("store", "index", "--store", store, "--backend", "faiss").exit_code == 0
    rows = rows_by_id(store)
    patient = sorted({row["patient"] for _v, row in rows.values()})[1]
    gone = {i for i, (_v, row) in rows.items() if row["patient"] == patient}
    result = cli("store", "remove", "--patient", patient, "--store", store, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["index"] == "updated"  # keys of the rewritten shards replaced
    assert cli("store", "verify", "--store", store).exit_code == 0
    for query in list(set(rows) - gone)[:4]:
        found = cli("retrieve", query, "--store", store, "--model", package, "-k", "50", "--search", "ann",
                    "--json")
        assert found.exit_code == 0, found.output
        payload = json.loads(found.stdout)
        assert payload["search"] == "ann"
        ids = {r["id"] for r in payload["results"]}
        assert ids and not ids & gone


def test_prune_drops_changed_and_vanished_sources(built):
    package, store, cohort = built
    before = rows_by_id(store)
    files = sorted(cohort.rglob("*.dcm"))
    deleted, touched = files[0], files[5]
    deleted.unlink()
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns - 10**9))

    def ids_for(path: Path) -> set[str]:
        rel = path.relative_to(cohort.parent).as_posix()
        return {i for i, (_v, row) in before.items() if row["path"] == rel}

    expected = {"vanished": ids_for(deleted), "changed": ids_for(touched)}
    assert len(expected["vanished"]) == 1 and len(expected["changed"]) == 1
    snapshot = store_bytes(store)
    dry = cli("store", "prune", "--store", store, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert store_bytes(store) == snapshot
    assert {r["id"]: r["reason"] for r in json.loads(dry.stdout)["removed"]} == {
        next(iter(ids)): why for why, ids in expected.items()}

    result = cli("store", "prune", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows_removed"] == 2
    assert set(rows_by_id(store)) == set(before) - expected["vanished"] - expected["changed"]
    assert cli("store", "verify", "--store", store).exit_code == 0
    # the changed file is embedded again by the next run; nothing else is
    again = cli("embed", cohort, "--model", package, "--store", store)
    assert again.exit_code == 0 and "embedded 1," in again.output
    assert len(EmbeddingStore.open(store)) == 31


def test_prune_keeps_rows_of_a_root_that_is_not_there(built):
    _package, store, cohort = built
    cohort.rename(cohort.with_name("elsewhere"))  # an unmounted drive looks like this
    snapshot = store_bytes(store)
    result = cli("store", "prune", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows_removed"] == 0 and any("rows were kept" in n for n in summary["notes"])
    assert store_bytes(store) == snapshot


@pytest.fixture
def home(toy_packages_home):
    return toy_packages_home / "home"


def test_models_remove_removes_and_clears_the_default(home):
    assert cli("models", "default", "toy@1.0.0").exit_code == 0
    result = cli("models", "remove", "toy@1.0.0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"removed": "toy@1.0.0", "path": str(home / "models" / "toy-1.0.0"),
                                         "default_cleared": True}
    assert sorted(p.name for p in (home / "models").iterdir()) == ["toy-1.1.0"]  # no staging debris left
    assert "default_model" not in json.loads((home / "config.json").read_text())
    listed = json.loads(cli("models", "list", "--json").stdout)["packages"]
    assert sorted((p["name"], p["version"]) for p in listed) == [("mine", "0.1.0"), ("toy", "1.1.0")]
    # a default naming another package is kept
    assert cli("models", "default", "mine").exit_code == 0
    assert cli("models", "remove", "toy").exit_code == 0
    assert json.loads((home / "config.json").read_text())["default_model"] == "mine"
    assert not (home / "models" / "toy-1.1.0").exists()


def test_models_remove_refuses_exported_unknown_and_ambiguous(home):
    exported = Path("exported") / "mine"
    for ref in ("mine", "exported/mine"):
        result = cli("models", "remove", ref)
        assert result.exit_code == 2
        assert "not an installed package" in result.output and "mine" in result.output
        assert (exported / "retina.json").is_file()
    unknown = cli("models", "remove", "nosuch")
    assert unknown.exit_code == 2
    assert "toy@1.0.0" in unknown.output and "toy@1.1.0" in unknown.output
    ambiguous = cli("models", "remove", "toy")
    assert ambiguous.exit_code == 2 and "toy@1.0.0, toy@1.1.0" in ambiguous.output
    assert sorted(p.name for p in (home / "models").iterdir()) == ["toy-1.0.0", "toy-1.1.0"]


def test_errors_csv_stays_valid_csv(built):
    """errors.csv rewritten by remove keeps its header and quoting."""
    _package, store, _cohort = built
    patient = EmbeddingStore.open(store).metadata(["patient"])[0]["patient"]
    with open(store / "errors.csv", "a", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerow(["a, b/c.dcm", f"names {patient}, too"])
    assert cli("store", "remove", "--patient", patient, "--store", store).exit_code == 0
    with open(store / "errors.csv", newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == [["path", "reason"]]


def test_remove_by_raw_patient_id_never_prints_it(built):
    """A user who has only the hospital's ID gets it matched through the store's key; no output names it."""
    import pydicom

    _package, store, cohort = built
    dicom = sorted(cohort.rglob("*.dcm"))[0]
    raw = str(pydicom.dcmread(dicom, stop_before_pixels=True).PatientID)
    rows = rows_by_id(store)
    rel = dicom.relative_to(cohort.parent).as_posix()
    patient = next(row["patient"] for _v, row in rows.values() if row["path"] == rel)
    gone = {i for i, (_v, row) in rows.items() if row["patient"] == patient}
    for args in (("--dry-run",), ("--json",)):
        result = cli("store", "remove", "--patient", raw, "--store", store, *args)
        assert result.exit_code == 0, result.output
        assert raw not in result.output
    assert set(rows_by_id(store)) == set(rows) - gone


def test_a_remove_cut_short_before_store_json_leaves_the_old_store(built, monkeypatch):
    """Stopped at the commit point (store.json not yet replaced): every row is still there, the new
    shard files are unlisted debris, and the next remove completes with nothing stray left."""
    import retinacli.fsutil as fsutil

    _package, store, _cohort = built
    before = rows_by_id(store)
    patient = next(iter(before.values()))[1]["patient"]
    real_write = fsutil.atomic_write_bytes

    def stop_at_commit(path, data):
        if Path(path).name == "store.json":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(fsutil, "atomic_write_bytes", stop_at_commit)
    assert cli("store", "remove", "--patient", patient, "--store", store).exit_code != 0
    monkeypatch.setattr(fsutil, "atomic_write_bytes", real_write)
    after = rows_by_id(store)
    assert set(after) == set(before)
    for item, (vector, _row) in after.items():
        np.testing.assert_array_equal(vector, before[item][0])
    assert cli("store", "verify", "--store", store).exit_code == 0
    assert cli("store", "remove", "--patient", patient, "--store", store).exit_code == 0
    assert all(row["patient"] != patient for _v, row in rows_by_id(store).values())
    verify = json.loads(cli("store", "verify", "--store", store, "--json").stdout)
    assert verify["healthy"] and verify["problems"] == []
