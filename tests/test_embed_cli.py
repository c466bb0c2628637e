"""`retina embed / retrieve / predict` through the CLI, with the stand-in engine and readers of
test_store.py (fast; the real readers + exported package run in test_embed_package.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_store import StandInEngine, make_folder, standin_discover, standin_read
from typer.testing import CliRunner

from retinacli import pipeline
from retinacli.cli import app
from retinacli.errors import EXIT_STORE_BUSY, EXIT_USAGE
from retinacli.store import EmbeddingStore, StoreWriter, read_errors

runner = CliRunner()


@pytest.fixture
def standins(monkeypatch, tmp_path):
    """Route the commands to the stand-in engine/readers; run in an empty working directory."""
    engines = {"standin": StandInEngine(), "other": StandInEngine(model_id="other@1.0.0+111111111111")}

    def load_engine(model, backend="auto", precision="auto", device=None):
        name = model or "standin"
        return engines[Path(name).name], Path("/packages") / Path(name).name

    def find_package_by_model_id(model_id):
        return next((Path(n) for n, e in engines.items() if e.model_id == model_id), None)

    monkeypatch.setattr(pipeline, "load_engine", load_engine)
    monkeypatch.setattr(pipeline, "discover_with_readers", standin_discover)
    monkeypatch.setattr(pipeline, "read_with_readers", standin_read)
    monkeypatch.setattr("retinacli.package.find_package_by_model_id", find_package_by_model_id)
    monkeypatch.delenv("RETINA_STORE", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return engines


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_embed_defaults_to_dot_retina_store_and_echoes_them(standins, tmp_path):
    data = make_folder(tmp_path / "data", n_pairs=3, bad=1)
    result = run("embed", data, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["embedded"] == 6 and summary["skipped"] == 0 and summary["failed"] == 1
    assert summary["store"] == str(Path(".retina") / "store")
    assert summary["model"] == "standin@0.1.0+000000000000"
    assert summary["errors"] == [{"path": "data/bad0.npy", "error": "truncated pixel data"}]  # root-relative
    assert "store: .retina/store (default ./.retina/store)" in result.stderr
    assert "model: standin@0.1.0+000000000000" in result.stderr
    assert "failed:" in result.stderr and "bad0.npy: truncated pixel data" in result.stderr
    assert len(EmbeddingStore.open(Path(".retina/store"))) == 6
    assert read_errors(Path(".retina/store")) == [("data/bad0.npy", "truncated pixel data")]
    again = json.loads(run("embed", data, "--json").stdout)
    assert (again["embedded"], again["skipped"]) == (0, 6)


def test_retina_store_env_and_help_show_defaults(standins, tmp_path, monkeypatch):
    monkeypatch.setenv("RETINA_STORE", str(tmp_path / "envstore"))
    data = make_folder(tmp_path / "data", n_pairs=1, bad=0)
    result = run("embed", data)
    assert result.exit_code == 0, result.output
    assert f"store: {tmp_path / 'envstore'} ($RETINA_STORE)" in result.stderr
    assert "embedded 2, skipped 0" in result.stdout
    for command, needles in {
        "embed": ["./.retina/store", "$RETINA_STORE", "$RETINA_MODEL", "--batch-size", "16", "--workers"],
        "retrieve": ["./.retina/store", "the other modality", "--top", "10"],
        "predict": ["./.retina/store", "every OCT item", "--task"],
    }.items():
        help_text = " ".join(run(command, "--help").output.replace("│", " ").split())
        for needle in needles:
            assert needle in help_text, (command, needle)


def test_retrieve_json_other_modality_laterality_and_self(standins, tmp_path):
    data = make_folder(tmp_path / "data", n_pairs=6, bad=0)
    assert run("embed", data).exit_code == 0
    result = run("retrieve", data / "eye0_OD_fundus.npy", "--top", "5", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["model"] == "standin@0.1.0+000000000000" and payload["target"] == "oct"
    assert payload["query"]["modality"] == "fundus" and payload["query"]["laterality"] == "OD"
    results = payload["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert set(results[0]) == {"rank", "score", "id", "root", "path", "modality", "laterality", "date",
                               "same_eye", "ood_score", "ood"}
    assert all(r["modality"] == "oct" for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # The query file's id is its id in the store: retrieving by id with --target gives itself at ~1.
    by_id = json.loads(run("retrieve", payload["query"]["id"], "--target", "fundus", "--json").stdout)
    assert by_id["results"][0]["id"] == payload["query"]["id"]
    assert by_id["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    # stored paths are relative to the root given to embed (data), with its id
    assert (by_id["query"]["root"], by_id["query"]["path"]) == ("r0", "data/eye0_OD_fundus.npy")
    left = json.loads(run("retrieve", data / "eye0_OD_fundus.npy", "--laterality", "os", "--json").stdout)
    assert len(left["results"]) == 3 and {r["laterality"] for r in left["results"]} == {"OS"}
    table = run("retrieve", payload["query"]["id"])
    assert table.exit_code == 0 and "rank" in table.stdout and results[0]["id"] in table.stdout
    # The title names the query relative to its folder (a folder name can name the patient) and
    # shows only the metadata it has (no "?" placeholders).
    title = " ".join(run("retrieve", data / "eye0_OD_fundus.npy", "--top", "2").stdout.split())
    known = ", ".join(v for v in ("fundus", "OD", payload["query"]["date"]) if v)
    assert f"oct items nearest to eye0_OD_fundus.npy ({known})" in title and str(data) not in title
    assert "?" not in title


def test_retrieve_refuses_another_model_and_unknown_query(standins, tmp_path):
    data = make_folder(tmp_path / "data", n_pairs=1, bad=0)
    assert run("embed", data).exit_code == 0
    wrong = run("retrieve", data / "eye0_OD_fundus.npy", "--model", "other")
    assert wrong.exit_code == EXIT_USAGE and "holds embeddings of model standin@0.1.0" in wrong.stderr
    unknown = run("retrieve", "i0000000000000000")
    assert unknown.exit_code == EXIT_USAGE and "not a file, and no item with this id" in unknown.stderr
    missing = run("retrieve", "whatever", "--store", tmp_path / "nostore")
    assert missing.exit_code == EXIT_USAGE and "no embedding store here" in missing.stderr


def test_embed_refuses_another_model_and_a_busy_store(standins, tmp_path):
    data = make_folder(tmp_path / "data", n_pairs=1, bad=0)
    assert run("embed", data, "--store", tmp_path / "s").exit_code == 0
    wrong = run("embed", data, "--store", tmp_path / "s", "--model", "other")
    assert wrong.exit_code == EXIT_USAGE and "refusing to add vectors from other@1.0.0" in wrong.stderr
    engine = standins["standin"]
    with StoreWriter.open_for_model(tmp_path / "s", model_id=engine.model_id, embed_dim=8):
        busy = run("embed", data, "--store", tmp_path / "s")
    assert busy.exit_code == EXIT_STORE_BUSY and "is being written by" in busy.stderr


def test_predict_from_store_and_from_files(standins, tmp_path):
    data = make_folder(tmp_path / "data", n_pairs=4, bad=0)
    assert run("embed", data).exit_code == 0
    result = run("predict", "--task", "bcva", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["source"] == "store" and payload["model"] == "standin@0.1.0+000000000000"
    preds = payload["predictions"]
    assert len(preds) == 4 and all(p["modality"] == "oct" for p in preds)
    assert all(0.0 <= p["probability"] <= 1.0 and p["label"] in (0, 1) for p in preds)
    cst = json.loads(run("predict", "--task", "cst", "--json").stdout)["predictions"]
    assert len(cst) == 4 and all(p["units"] == "µm" and isinstance(p["value"], float) for p in cst)
    # On files: embedded on the fly, one record per OCT input, same ids as in the store, store untouched.
    files = run("predict", data / "eye1_OS_oct.npy", data / "eye2_OD_oct.npy", "--task", "bcva", "--json")
    assert files.exit_code == 0, files.output
    on_files = json.loads(files.stdout)["predictions"]
    assert [Path(p["path"]).name for p in on_files] == ["eye1_OS_oct.npy", "eye2_OD_oct.npy"]
    by_id = {p["id"]: p for p in preds}
    for p in on_files:
        assert p["probability"] == pytest.approx(by_id[p["id"]]["probability"], abs=1e-6)
    assert len(EmbeddingStore.open(Path(".retina/store"))) == 8
    csv_out = run("predict", "--task", "cst", "--csv").stdout.splitlines()
    assert csv_out[0].startswith("id,path,modality,laterality,date,task,value,units") and len(csv_out) == 5
    no_head = run("predict", "--task", "tn")
    assert no_head.exit_code == EXIT_USAGE and "has no 'tn' head" in no_head.stderr


def test_no_identifiers_in_any_output(standins, tmp_path):
    data = make_folder(tmp_path / "data", n_pairs=2, bad=1)
    outputs = [run("embed", data, "--json"), run("predict", "--task", "bcva", "--json"),
               run("retrieve", data / "eye0_OD_fundus.npy", "--json")]
    blobs = [r.stdout.encode() + r.stderr.encode() for r in outputs]
    store_files = [p for p in Path(".retina/store").rglob("*") if p.is_file() and p.name != "secret.key"]
    blobs += [p.read_bytes() for p in store_files]
    assert not any(b"SYN000042" in blob for blob in blobs)


def test_sigkilled_embed_resumes_without_duplicates(tmp_path):
    """A subprocess killed (SIGKILL) right after its first shard commit; the rerun completes it."""
    data = make_folder(tmp_path / "data", n_pairs=5, bad=0)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_store import StandInEngine, standin_discover, standin_read
from retinacli import package, pipeline, store
from retinacli.cli import app
engine = StandInEngine()
pipeline.load_engine = lambda model, *choice: (engine, "standin")
# the rerun embeds into an existing store: it looks up the store's package by model id
package.find_package_by_model_id = lambda model_id: "standin"
pipeline.discover_with_readers = standin_discover
pipeline.read_with_readers = standin_read
if os.environ.get("KILL_AFTER_FIRST_SHARD"):
    commit = store.StoreWriter.commit
    def commit_then_die(self):
        index = commit(self)
        if index is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return index
    store.StoreWriter.commit = commit_then_die
app(sys.argv[1:])
"""
    args = [sys.executable, "-c", script, "embed", str(data), "--store", str(tmp_path / "s"),
            "--shard-size", "3", "--batch-size", "2", "--json"]
    killed = subprocess.run(args, env={**os.environ, "KILL_AFTER_FIRST_SHARD": "1"}, capture_output=True)
    assert killed.returncode == -9
    partial = len(EmbeddingStore.open(tmp_path / "s"))
    assert 3 <= partial < 10
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["embedded"], summary["skipped"], summary["rows"]) == (10 - partial, partial, 10)
    rows = EmbeddingStore.open(tmp_path / "s").metadata()
    assert len({r["id"] for r in rows}) == 10 and len({r["path"] for r in rows}) == 10


def test_cli_import_does_not_import_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import retinacli.cli"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert imported and not [m for m in imported if m.split(".")[0] in ("torch", "torchvision")]


def write_png_folder(root: Path, n: int = 4) -> Path:
    """n fundus PNGs and n OCT volumes as B-scan PNG folders, plus one truncated PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    for i in range(n):
        volume = root / f"oct{i}"
        volume.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(volume / f"bscan_{j}.png")
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"fundus{i}.png")
    (root / "cut.png").write_bytes((root / "fundus0.png").read_bytes()[:60])
    return root


def test_real_engine_and_readers_in_a_torch_free_process(toy_package, tmp_path):
    """The real readers + onnxruntime engine (the torch-free toy package), in a fresh interpreter."""
    data = write_png_folder(tmp_path / "data")
    script = (
        "import sys\nfrom retinacli.cli import app\n"
        "try:\n    app(sys.argv[1:])\nfinally:\n"
        "    assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')]\n"
    )
    store = tmp_path / "store"
    result = subprocess.run([sys.executable, "-c", script, "embed", str(data), "--model", str(toy_package),
                             "--store", str(store), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["failed"]) == (8, 1)
    assert summary["errors"][0]["path"].endswith("cut.png")
    rows = EmbeddingStore.open(store).metadata()
    oct_names = sorted(Path(r["path"]).name for r in rows if r["modality"] == "oct")
    assert oct_names == ["oct0", "oct1", "oct2", "oct3"]
    # In-process from here: retrieve and predict with the same package.
    payload = json.loads(run("retrieve", data / "fundus2.png", "--store", store, "--model", toy_package,
                             "--top", "3", "--json").stdout)
    assert [r["modality"] for r in payload["results"]] == ["oct"] * 3
    assert payload["query"]["id"] in {r["id"] for r in rows}
    preds = json.loads(run("predict", "--task", "tn", "--store", store, "--model", toy_package,
                           "--json").stdout)["predictions"]
    assert len(preds) == 4 and all(0 <= p["probability"] <= 1 for p in preds)
    cst = json.loads(run("predict", data / "oct1", "--task", "cst", "--model", toy_package,
                         "--json").stdout)["predictions"]
    assert len(cst) == 1 and cst[0]["units"] == "µm" and Path(cst[0]["path"]).name == "oct1"
