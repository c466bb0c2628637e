"""End to end with the real readers and a real exported package: the synthetic DICOM cohort
(`tiny_cohort`) embedded with `tiny_package`, then retrieve and predict.

Fresh interpreters run the commands whose torch-free promise or SIGKILL is under test; the rest
run in-process with the package's Engine loaded once (loading hashes ~150 MB of ONNX)."""

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
from typer.testing import CliRunner

from retinacli import pipeline
from retinacli.cli import app
from retinacli.privacy import SECRET_FILE
from retinacli.retrieval import search
from retinacli.store import EmbeddingStore
from retinacli.tasks import TASKS

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


def retina(*args, script=NO_TORCH, check=True):
    """Run the CLI in a fresh interpreter (asserting it never imported torch)."""
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "RETINA_MODEL": ""})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


_ENGINES: dict[str, tuple] = {}


@pytest.fixture
def cli(monkeypatch, tmp_path, tiny_package):
    """In-process `retina ...`: the tiny package is installed in $RETINA_HOME (so the store's model is
    found by its id) and its Engine is loaded once per session."""
    home = tmp_path / "retina_home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny").symlink_to(tiny_package, target_is_directory=True)
    monkeypatch.setenv("RETINA_HOME", str(home))
    monkeypatch.delenv("RETINA_MODEL", raising=False)
    monkeypatch.delenv("RETINA_STORE", raising=False)
    load = pipeline.load_engine

    def load_once(model, *choice):
        key = (str(Path(model).resolve()) if model else "default", *choice)
        if key not in _ENGINES:
            _ENGINES[key] = load(model, *choice)
        return _ENGINES[key]

    monkeypatch.setattr(pipeline, "load_engine", load_once)
    runner = CliRunner()

    def invoke(*args, code=0):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == code, result.output
        return result

    return invoke


def manifest_rows(cohort: Path) -> list[dict[str, str]]:
    with open(cohort / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def heads_of(package: Path) -> dict:
    return json.loads((package / "retina.json").read_text())["heads"]


@pytest.fixture(scope="module")
def embedded(tiny_cohort, tiny_package, tmp_path_factory):
    """The cohort embedded once into a store (fresh interpreter, torch-free); its --json summary."""
    store = tmp_path_factory.mktemp("store") / "store"
    result = retina("embed", tiny_cohort, "--model", tiny_package, "--store", store, "--json")
    return store, json.loads(result.stdout), result


def test_embed_cohort_then_nothing_the_second_time(embedded, tiny_cohort, tiny_package, cli):
    store_root, summary, result = embedded
    rows = manifest_rows(tiny_cohort)
    n_items = len({r["oct_path"] for r in rows}) + len({r["fundus_path"] for r in rows})
    assert summary["embedded"] == n_items and summary["failed"] == 0 and summary["rows"] == n_items
    assert f"model: {summary['model']}" in result.stderr and f"store: {store_root}" in result.stderr
    store = EmbeddingStore.open(store_root)
    meta = store.metadata()
    assert {m["modality"] for m in meta} == {"oct", "fundus"} and len({m["id"] for m in meta}) == n_items
    assert {m["laterality"] for m in meta} == {"OD", "OS"} and all(m["date"] for m in meta)
    assert len({m["patient"] for m in meta}) == len({r["patient_id"] for r in rows})
    vectors = store.vectors()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    # Every OCT references its localizer fundus by the fundus's id.
    ids = {m["id"] for m in meta if m["modality"] == "fundus"}
    assert all(m["references"] in ids for m in meta if m["modality"] == "oct")
    print(f"\nembed throughput on the tiny cohort: {summary['items_per_second']} items/s "
          f"({n_items} items in {summary['seconds']} s, reading to last commit, package hashing excluded)")
    again = cli("embed", tiny_cohort, "--model", tiny_package, "--store", store_root, "--json")
    again = json.loads(again.stdout)
    assert (again["embedded"], again["skipped"], again["rows"]) == (0, n_items, n_items)


def test_retrieve_fundus_finds_oct_with_filters_and_self(embedded, tiny_cohort, tiny_package, cli, tmp_path,
                                                          monkeypatch):
    store_root, _, _ = embedded
    rows = manifest_rows(tiny_cohort)
    query = tiny_cohort / rows[0]["fundus_path"]
    # A fresh interpreter: retrieve embeds the query with onnxruntime, never torch.
    result = retina("retrieve", query, "--store", store_root, "--top", "5", "--model", tiny_package, "--json")
    payload = json.loads(result.stdout)
    assert payload["query"]["modality"] == "fundus" and payload["target"] == "oct"
    assert payload["query"]["laterality"] == rows[0]["eye"]
    results = payload["results"]
    assert len(results) == 5 and [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert all(r["modality"] == "oct" for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # Without --model: the store's model, found among the known packages (here ./exported only).
    shutil.copytree(tiny_package, tmp_path / "work" / "exported" / "tiny", symlinks=True)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "empty_home"))
    found = json.loads(cli("retrieve", query, "--store", store_root, "--top", "5", "--json").stdout)
    assert found["results"] == results and found["query"]["id"] == payload["query"]["id"]
    # The laterality filter, and the query itself (by id, same modality) at score 1.
    other = "OS" if rows[0]["eye"] == "OD" else "OD"
    qid = payload["query"]["id"]
    filtered = json.loads(cli("retrieve", qid, "--store", store_root, "--laterality", other, "--json").stdout)
    assert filtered["results"] and all(r["laterality"] == other for r in filtered["results"])
    itself = json.loads(cli("retrieve", qid, "--store", store_root, "--target", "fundus", "--top", "3",
                            "--json").stdout)["results"]
    assert itself[0]["id"] == qid and itself[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # How often the same eye's OCT of that visit is among the top 5 (reported, not asserted: tiny model).
    store = EmbeddingStore.open(store_root)
    meta, vectors = store.metadata(), store.vectors()
    row_of = {m["path"]: i for i, m in enumerate(meta)}  # relative to the folder holding the root
    hits = 0
    for row in rows:
        fundus = row_of[f"{tiny_cohort.name}/{row['fundus_path']}"]
        oct_id = meta[row_of[f"{tiny_cohort.name}/{row['oct_path']}"]]["id"]
        hits += oct_id in {h.row["id"] for h in search(store, vectors[fundus], target="oct", top_k=5)}
    print(f"\nfundus->OCT top-5 with the tiny package: {hits}/{len(rows)} (chance {5 / len(rows):.2f})")


def test_predict_every_oct_item_from_the_store(embedded, tiny_package, cli):
    store_root, summary, _ = embedded
    n_oct = sum(1 for m in EmbeddingStore.open(store_root).metadata(["modality"]) if m["modality"] == "oct")
    heads = heads_of(tiny_package)
    assert {"cst", "bcva"} <= set(heads)
    for task in sorted(heads):
        payload = json.loads(cli("predict", "--task", task, "--store", store_root, "--json").stdout)
        preds = payload["predictions"]
        assert payload["model"] == summary["model"] and len(preds) == n_oct
        assert all(p["modality"] == "oct" for p in preds)
        if TASKS[task].kind == "regression":
            assert all(p["units"] == TASKS[task].units and np.isfinite(p["value"]) for p in preds)
        else:
            assert all(0.0 <= p["probability"] <= 1.0 and p["label"] in (0, 1) for p in preds)
            assert all(p["threshold"] == pytest.approx(heads[task]["threshold"]) for p in preds)


def test_predict_on_files_matches_the_store(embedded, tiny_cohort, tiny_package, cli):
    store_root, _, _ = embedded
    rows = manifest_rows(tiny_cohort)
    files = [tiny_cohort / rows[i]["oct_path"] for i in (0, 1)]
    on_files = json.loads(cli("predict", *files, "--task", "bcva", "--model", tiny_package, "--store",
                              store_root, "--json").stdout)["predictions"]
    from_store = {p["id"]: p for p in json.loads(cli("predict", "--task", "bcva", "--store", store_root,
                                                     "--json").stdout)["predictions"]}
    # each file is its own root (r0, r1): shown relative to the folder holding it
    assert [(p["root"], p["path"]) for p in on_files] == [("r0", files[0].name), ("r1", files[1].name)]
    for p in on_files:
        assert p["probability"] == pytest.approx(from_store[p["id"]]["probability"], abs=1e-4)
    assert len(EmbeddingStore.open(store_root)) == 2 * len(rows)  # nothing was written


def test_sigkilled_run_resumes_to_the_uninterrupted_store(embedded, tiny_cohort, tiny_package, tmp_path):
    store_root, _, _ = embedded
    killed_root = tmp_path / "killed"
    killed_root.mkdir()
    shutil.copy(store_root / SECRET_FILE, killed_root / SECRET_FILE)  # same secret -> comparable ids
    args = ["embed", tiny_cohort, "--store", killed_root, "--model", tiny_package, "--shard-size", "6",
            "--batch-size", "4", "--json"]
    killed = retina(*args, script=KILL_AFTER_FIRST_SHARD, check=False)
    assert killed.returncode == -signal.SIGKILL
    partial = len(EmbeddingStore.open(killed_root))
    assert partial >= 6
    resumed = json.loads(retina(*args).stdout)
    full, again = EmbeddingStore.open(store_root), EmbeddingStore.open(killed_root)
    assert resumed["skipped"] == partial and resumed["embedded"] == len(full) - partial
    full_rows = {m["id"]: i for i, m in enumerate(full.metadata())}
    again_rows = {m["id"]: i for i, m in enumerate(again.metadata())}
    assert full_rows.keys() == again_rows.keys() and len(again_rows) == len(again)  # no duplicates
    fv, av = full.vectors(), again.vectors()
    for item_id, i in full_rows.items():  # batch size 4 vs 16: equal up to float rounding
        np.testing.assert_allclose(av[again_rows[item_id]], fv[i], atol=1e-5)


def test_no_patient_identifiers_in_any_output(embedded, tiny_cohort, cli):
    import pydicom

    store_root, _, embed_result = embedded
    rows = manifest_rows(tiny_cohort)
    headers = [pydicom.dcmread(tiny_cohort / r["oct_path"], stop_before_pixels=True) for r in rows]
    assert all(str(h.PatientName).startswith("SYNTH^P") for h in headers)
    assert all(re.fullmatch(r"SYN\d{6}", str(h.PatientID)) for h in headers)
    birth_dates = {str(h.PatientBirthDate) for h in headers if h.get("PatientBirthDate")}
    outputs = [embed_result.stdout + embed_result.stderr]
    for args in (["retrieve", tiny_cohort / rows[0]["oct_path"], "--json"],
                 ["retrieve", tiny_cohort / rows[1]["fundus_path"]],
                 ["predict", "--task", "cst"], ["predict", "--task", "bcva", "--csv"]):
        result = cli(*args, "--store", store_root)
        outputs.append(result.stdout + result.stderr)
    blobs = [o.encode() for o in outputs]
    blobs += [p.read_bytes() for p in store_root.rglob("*") if p.is_file() and p.name != SECRET_FILE]
    patterns = [rb"SYNTH\^P", rb"SYN\d{6}", rb"SYNACC", *(re.escape(d.encode()) for d in birth_dates)]
    found = [m.group() for blob in blobs for p in patterns for m in [re.search(p, blob)] if m]
    assert birth_dates and not found
