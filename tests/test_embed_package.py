"""End to end with the real readers and a real exported package: the synthetic DICOM cohort
(`tiny_cohort`) embedded with `tiny_package`, then retrieve and predict, in subprocesses where the
torch-free promise or a SIGKILL is part of the test."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import fixtures_cohort
import fixtures_models
import fixtures_packages
import numpy as np
import pytest

from retinacli.privacy import SECRET_FILE
from retinacli.store import EmbeddingStore

if not all(hasattr(m, f) for m, f in ((fixtures_cohort, "tiny_cohort"), (fixtures_models, "tiny_run"),
                                      (fixtures_packages, "tiny_package"))):
    pytest.skip("the tiny_cohort / tiny_package fixtures are not available", allow_module_level=True)

NO_TORCH = (
    "import sys\n"
    "from retinacli.cli import app\n"
    "try:\n"
    "    app(sys.argv[1:])\n"
    "finally:\n"
    "    bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
    "    assert not bad, f'torch imported: {bad[:5]}'\n"
)

KILL_AFTER_FIRST_SHARD = (
    "import os, signal, sys\n"
    "from retinacli import store\n"
    "from retinacli.cli import app\n"
    "commit = store.StoreWriter.commit\n"
    "def commit_then_die(self):\n"
    "    index = commit(self)\n"
    "    if index is not None:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    return index\n"
    "store.StoreWriter.commit = commit_then_die\n"
    "app(sys.argv[1:])\n"
)


def retina(*args, script=NO_TORCH, cwd=None, env=None, check=True):
    """Run the CLI in a fresh interpreter (asserting it never imported torch)."""
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def manifest_rows(cohort: Path) -> list[dict[str, str]]:
    with open(cohort / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def embedded(tiny_cohort, tiny_package, tmp_path_factory):
    """The cohort embedded once into a store (subprocess, torch-free); its --json summary."""
    store = tmp_path_factory.mktemp("store") / "store"
    result = retina("embed", tiny_cohort, "--model", tiny_package, "--out", store, "--json")
    return store, json.loads(result.stdout), result


def test_embed_cohort_then_nothing_the_second_time(embedded, tiny_cohort, tiny_package):
    store_root, summary, result = embedded
    rows = manifest_rows(tiny_cohort)
    n_items = len({r["oct_path"] for r in rows}) + len({r["fundus_path"] for r in rows})
    assert summary["embedded"] == n_items and summary["failed"] == 0 and summary["rows"] == n_items
    assert f"model: {summary['model']}" in result.stderr and f"store: {store_root}" in result.stderr
    store = EmbeddingStore.open(store_root)
    meta = store.metadata()
    assert {m["modality"] for m in meta} == {"oct", "fundus"} and len({m["id"] for m in meta}) == n_items
    assert {m["laterality"] for m in meta} == {"OD", "OS"} and all(m["date"] for m in meta)
    vectors = store.vectors()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    # Every OCT references its localizer fundus by the fundus's id.
    ids = {m["id"] for m in meta if m["modality"] == "fundus"}
    assert all(m["references"] in ids for m in meta if m["modality"] == "oct")
    print(f"\nembed throughput on the tiny cohort: {summary['items_per_second']} items/s "
          f"({n_items} items in {summary['seconds']} s)")
    again = json.loads(retina("embed", tiny_cohort, "--model", tiny_package, "--out", store_root,
                              "--json").stdout)
    assert (again["embedded"], again["skipped"], again["rows"]) == (0, n_items, n_items)


def test_retrieve_fundus_finds_oct_with_filters_and_self(embedded, tiny_cohort, tiny_package, tmp_path):
    store_root, _, _ = embedded
    rows = manifest_rows(tiny_cohort)
    query = tiny_cohort / rows[0]["fundus_path"]
    result = retina("retrieve", query, "--index", store_root, "--top", "5", "--json")
    payload = json.loads(result.stdout)
    assert payload["query"]["modality"] == "fundus" and payload["target"] == "oct"
    results = payload["results"]
    assert len(results) == 5 and [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert all(r["modality"] == "oct" for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # Without --model: the store's model, found among the known packages (here ./exported).
    shutil.copytree(tiny_package, tmp_path / "exported" / tiny_package.name)
    found = retina("retrieve", query, "--index", store_root, "--top", "5", "--json", cwd=tmp_path,
                   env={"RETINA_HOME": str(tmp_path / "home"), "RETINA_MODEL": ""})
    assert json.loads(found.stdout)["results"] == results
    lat = rows[0]["eye"]
    other = "OS" if lat == "OD" else "OD"
    filtered = json.loads(retina("retrieve", query, "--index", store_root, "--laterality", other,
                                 "--json").stdout)["results"]
    assert filtered and all(r["laterality"] == other for r in filtered)
    qid = payload["query"]["id"]
    itself = json.loads(retina("retrieve", qid, "--index", store_root, "--target", "fundus", "--top", "3",
                               "--json").stdout)["results"]
    assert itself[0]["id"] == qid and itself[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_predict_every_oct_item_from_the_store(embedded, tiny_package):
    store_root, summary, _ = embedded
    n_oct = sum(1 for m in EmbeddingStore.open(store_root).metadata(["modality"]) if m["modality"] == "oct")
    manifest = json.loads((tiny_package / "retina.json").read_text())
    for task in sorted(manifest["heads"]):
        payload = json.loads(retina("predict", "--task", task, "--index", store_root, "--json").stdout)
        preds = payload["predictions"]
        assert payload["model"] == summary["model"] and len(preds) == n_oct
        assert all(p["modality"] == "oct" for p in preds)
        if task == "cst":
            units = manifest["heads"]["cst"]["units"]
            assert all(p["units"] == units and np.isfinite(p["value"]) for p in preds)
        else:
            assert all(0.0 <= p["probability"] <= 1.0 and p["label"] in (0, 1) for p in preds)
            assert all(p["threshold"] == pytest.approx(manifest["heads"][task]["threshold"]) for p in preds)


def test_predict_on_files_matches_the_store(embedded, tiny_cohort, tiny_package):
    store_root, _, _ = embedded
    task = sorted(json.loads((tiny_package / "retina.json").read_text())["heads"])[0]
    rows = manifest_rows(tiny_cohort)
    files = [tiny_cohort / rows[i]["oct_path"] for i in (0, 1)]
    on_files = json.loads(retina("predict", *files, "--task", task, "--model", tiny_package, "--index",
                                 store_root, "--json").stdout)["predictions"]
    from_store = {p["id"]: p for p in json.loads(retina("predict", "--task", task, "--index", store_root,
                                                        "--json").stdout)["predictions"]}
    assert len(on_files) == 2
    key = "value" if task == "cst" else "probability"
    for p in on_files:
        assert p[key] == pytest.approx(from_store[p["id"]][key], abs=1e-4)


def test_sigkilled_run_resumes_to_the_uninterrupted_store(tiny_cohort, tiny_package, tmp_path):
    for name in ("full", "killed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / SECRET_FILE).write_text("cd" * 32)  # same secret -> comparable ids
    common = ["--model", tiny_package, "--shard-size", "3", "--batch-size", "2", "--json"]
    retina("embed", tiny_cohort, "--out", tmp_path / "full", *common)
    killed = retina("embed", tiny_cohort, "--out", tmp_path / "killed", *common,
                    script=KILL_AFTER_FIRST_SHARD, check=False)
    assert killed.returncode == -signal.SIGKILL
    partial = len(EmbeddingStore.open(tmp_path / "killed"))
    assert partial >= 3
    resumed = json.loads(retina("embed", tiny_cohort, "--out", tmp_path / "killed", *common).stdout)
    full, again = EmbeddingStore.open(tmp_path / "full"), EmbeddingStore.open(tmp_path / "killed")
    assert resumed["skipped"] == partial and len(again) == len(full)
    full_rows = {m["id"]: i for i, m in enumerate(full.metadata())}
    again_rows = {m["id"]: i for i, m in enumerate(again.metadata())}
    assert full_rows.keys() == again_rows.keys() and len(again_rows) == len(again)  # no duplicates
    fv, av = full.vectors(), again.vectors()
    for item_id, i in full_rows.items():
        np.testing.assert_allclose(av[again_rows[item_id]], fv[i], atol=1e-5)


def test_no_patient_identifiers_in_any_output(embedded, tiny_cohort, tiny_package):
    import pydicom

    store_root, _, embed_result = embedded
    rows = manifest_rows(tiny_cohort)
    birth_dates = {str(pydicom.dcmread(tiny_cohort / r["oct_path"], stop_before_pixels=True).PatientBirthDate)
                   for r in rows[:3]}
    outputs = [embed_result.stdout + embed_result.stderr]
    task = sorted(json.loads((tiny_package / "retina.json").read_text())["heads"])[0]
    for args in (["retrieve", tiny_cohort / rows[0]["fundus_path"], "--json"],
                 ["retrieve", tiny_cohort / rows[0]["oct_path"]],
                 ["predict", "--task", task]):
        result = retina(*args, "--index", store_root)
        outputs.append(result.stdout + result.stderr)
    blobs = [o.encode() for o in outputs]
    blobs += [p.read_bytes() for p in store_root.rglob("*") if p.is_file() and p.name != SECRET_FILE]
    pattern = re.compile(rb"SYNTH\^P|SYN\d{6}|" + b"|".join(d.encode() for d in birth_dates if d))
    assert not [m.group() for blob in blobs for m in [pattern.search(blob)] if m]

