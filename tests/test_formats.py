"""Format versions and the store's package: frozen 0.1.0 fixtures (tests/fixtures/v0_1_0, never
regenerated) still work, a store records its package and uses it from any folder, exporting another
package does not change an existing store's model, and newer formats are refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_packages import make_toy_package
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import EXIT_USAGE
from retinacli.store import STORE_FORMAT_VERSION, EmbeddingStore

pytest.importorskip("onnxruntime")

FROZEN = Path(__file__).parent / "fixtures" / "v0_1_0"
FROZEN_MODEL = "toy@0.1.0+6474dbc96760"  # the frozen package's id under model id rule 1: the frozen store's
# The same package's id under rule 2 (adds embed_dim and int8 graphs): what a new store made with it records.
CURRENT_MODEL = "toy@0.1.0+248663d55935"
FROZEN_FUNDUS_ID = "ifb5823b2adc6556e"  # a fundus row of the frozen store
FROZEN_OCT_IDS = {"i2339f19eca0bab1d", "ie0bd15e942f671ef"}

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def frozen(private_home, monkeypatch):
    """The 0.1.0 fixtures copied to tmp (tests never touch the originals); a private $RETINA_HOME,
    no $RETINA_MODEL, and an empty working folder."""
    copy = private_home / "v0_1_0"
    shutil.copytree(FROZEN, copy)
    monkeypatch.delenv("RETINA_STORE", raising=False)
    return copy


def _store_json(store: Path) -> dict:
    return json.loads((store / "store.json").read_text())


def _head_values(package: Path, task: str, vectors: np.ndarray) -> np.ndarray:
    """The head applied directly with onnxruntime: what predict must report."""
    import onnxruntime as ort

    descriptor = json.loads((package / "retina.json").read_text())
    head = descriptor["heads"][task]
    session = ort.InferenceSession(str(package / head["file"]), providers=["CPUExecutionProvider"])
    (out,) = session.run([head["output_name"]], {head["input_name"]: vectors.astype(np.float32)})
    return np.asarray(out).reshape(-1)


def test_frozen_fixtures_are_the_0_1_0_formats():
    """Guards the fixtures themselves: version 1 store, schema_version 1 package, 4 rows."""
    assert json.loads((FROZEN / "package" / "retina.json").read_text())["schema_version"] == 1
    index = _store_json(FROZEN / "store")
    assert index["format_version"] == 1 and "package" not in index
    assert index["model_id"] == FROZEN_MODEL and index["rows"] == 4


def test_0_1_0_package_verifies_and_embeds(frozen, tmp_path, monkeypatch):
    verify = run("models", "verify", frozen / "package")
    assert verify.exit_code == 0, verify.output
    monkeypatch.setenv("RETINA_STORE", str(tmp_path / "new"))
    result = run("embed", frozen / "source", "--model", frozen / "package", "--workers", 1, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["embedded"] == 4 and summary["failed"] == 0 and summary["model"] == CURRENT_MODEL
    store = EmbeddingStore.open(tmp_path / "new")
    assert store.format_version == STORE_FORMAT_VERSION == 4
    # format 3: the root given is recorded; rows name it and a path relative to its parent folder
    assert [(r.id, r.path) for r in store.roots] == [("r0", str((frozen / "source").absolute()))]
    assert {r["root"] for r in store.metadata()} == {"r0"}
    assert store.package_record == {"model_id": CURRENT_MODEL, "name": "toy", "version": "0.1.0",
                                    "path": str((frozen / "package").resolve())}
    # The frozen package still computes the frozen store's vectors (same files, same preprocessing).
    frozen_store = EmbeddingStore.open(frozen / "store")
    old = {r["path"].split("/png/")[1]: v for r, v in zip(frozen_store.metadata(), frozen_store.vectors(),
                                                          strict=True)}
    new = {r["path"].removeprefix("source/"): v
           for r, v in zip(store.metadata(), store.vectors(), strict=True)}
    assert sorted(old) == sorted(new)
    for key, vector in old.items():
        np.testing.assert_allclose(new[key], vector, atol=1e-6)


def test_0_1_0_store_retrieve_by_id_and_predict(frozen, monkeypatch):
    store_dir = frozen / "store"
    monkeypatch.setenv("RETINA_STORE", str(store_dir))
    store = EmbeddingStore.open(store_dir)
    assert (store.format_version, store.package_record, len(store)) == (1, None, 4)
    # Retrieval by item id needs no package at all.
    same = run("retrieve", FROZEN_FUNDUS_ID, "--target", "fundus", "--json")
    assert same.exit_code == 0, same.output
    top = json.loads(same.stdout)["results"][0]
    assert top["id"] == FROZEN_FUNDUS_ID and top["score"] == pytest.approx(1.0, abs=1e-5)
    other = json.loads(run("retrieve", FROZEN_FUNDUS_ID, "--json").stdout)
    assert {r["id"] for r in other["results"]} == FROZEN_OCT_IDS
    # Predict: with --model at the package, and as a user would (the package in ./exported).
    vectors = {r["id"]: v for r, v in zip(store.metadata(), store.vectors(), strict=True)}
    for args in (["--model", frozen / "package"], []):
        if not args:
            shutil.copytree(frozen / "package", Path("exported") / "toy")
        result = run("predict", "--task", "cst", "--json", *args)
        assert result.exit_code == 0, result.output
        predictions = json.loads(result.stdout)["predictions"]
        assert {p["id"] for p in predictions} == FROZEN_OCT_IDS
        expected = _head_values(frozen / "package", "cst", np.stack([vectors[p["id"]] for p in predictions]))
        np.testing.assert_allclose([p["value"] for p in predictions], expected, rtol=1e-5)
    # Reading never rewrites the old store.
    assert _store_json(store_dir)["format_version"] == 1


def test_0_1_0_store_is_upgraded_by_the_next_embed(frozen, monkeypatch):
    store_dir = frozen / "store"
    monkeypatch.setenv("RETINA_STORE", str(store_dir))
    shutil.copytree(frozen / "package", Path("exported") / "toy")
    result = run("embed", frozen / "source", "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "upgraded store.json from format version 1 to 4" in result.stderr
    assert "the store's package" in result.stderr
    index = _store_json(store_dir)
    assert index["format_version"] == 4 and index["rows"] == 8
    assert index["package"]["path"] == str((Path("exported") / "toy").resolve())
    assert index["package"]["model_id"] == FROZEN_MODEL


def test_store_records_package_and_works_from_another_folder(frozen, tmp_path, monkeypatch):
    project = Path.cwd()
    shutil.copytree(frozen / "package", project / "exported" / "toy")
    store_dir = tmp_path / "store"
    monkeypatch.setenv("RETINA_STORE", str(store_dir))
    assert run("embed", frozen / "source", "--workers", 1).exit_code == 0
    recorded = EmbeddingStore.open(store_dir).package_record["path"]
    assert recorded == str((project / "exported" / "toy").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no ./exported here: only the record finds the package
    query = next((frozen / "source").rglob("*_fundus.png"))
    result = run("retrieve", query, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["model"] == CURRENT_MODEL and len(payload["results"]) == 2
    predicted = run("predict", "--task", "tn", "--json")
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(predicted.stdout)["predictions"]) == 2
    assert str((project / "exported" / "toy").resolve()) in predicted.stderr
    info = json.loads(run("store", "info", "--json").stdout)
    assert info["package"]["found"] and info["package"]["how"] == "recorded in the store"


def test_exporting_a_newer_package_does_not_change_the_store_model(frozen, tmp_path, monkeypatch):
    from retinacli.package import package_model_id, resolve_package

    exported = Path("exported")
    shutil.copytree(frozen / "package", exported / "toy")
    store_dir = tmp_path / "store"
    monkeypatch.setenv("RETINA_STORE", str(store_dir))
    first = frozen / "source" / sorted(p.name for p in (frozen / "source").iterdir())[0]
    second = frozen / "source" / sorted(p.name for p in (frozen / "source").iterdir())[1]
    assert json.loads(run("embed", first, "--json", "--workers", 1).stdout)["model"] == CURRENT_MODEL
    newer = make_toy_package(exported / "toy2", name="toy", version="0.2.0", seed=1)
    assert resolve_package(None).resolve() == newer.resolve()  # the default package changed
    result = run("embed", second, "--json", "--workers", 1)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"] == CURRENT_MODEL and summary["embedded"] == 2 and summary["rows"] == 4
    query = next(second.rglob("*_fundus.png"))
    found = json.loads(run("retrieve", query, "--json").stdout)
    assert found["model"] == CURRENT_MODEL and found["query"]["id"] in {r["id"] for r in
                                                                      EmbeddingStore.open(store_dir).metadata()}
    on_files = run("predict", "--task", "cst", second, "--json")  # ids join the store's: its model
    assert on_files.exit_code == 0, on_files.output
    assert json.loads(on_files.stdout)["model"] == CURRENT_MODEL
    # A new store does get the new default; an explicit --model of another id is still refused.
    monkeypatch.setenv("RETINA_STORE", str(tmp_path / "other"))
    made = json.loads(run("embed", first, "--json", "--workers", 1).stdout)
    assert made["model"] == package_model_id(newer) != CURRENT_MODEL
    monkeypatch.setenv("RETINA_STORE", str(store_dir))
    wrong = run("embed", second, "--model", newer, "--workers", 1)
    assert wrong.exit_code == EXIT_USAGE and "refusing to add" in wrong.stderr


def test_missing_package_is_one_clear_line(frozen, tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    shutil.copytree(frozen / "package", package)
    store_dir = tmp_path / "store"
    monkeypatch.setenv("RETINA_STORE", str(store_dir))
    assert run("embed", frozen / "source", "--model", package, "--workers", 1).exit_code == 0
    shutil.rmtree(package)
    result = run("predict", "--task", "cst")
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1]
    message = errors[0]
    assert str(store_dir) in message and CURRENT_MODEL in message and str(package.resolve()) in message
    info = json.loads(run("store", "info", "--json").stdout)
    assert info["package"]["found"] is False and info["package"]["path"] is None


def test_newer_formats_are_refused_in_one_line(frozen):
    index = _store_json(frozen / "store")
    index["format_version"] = STORE_FORMAT_VERSION + 1
    (frozen / "store" / "store.json").write_text(json.dumps(index))
    result = run("store", "info", "--store", frozen / "store")
    assert result.exit_code != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message == (f"error: {frozen / 'store' / 'store.json'}: store format version "
                       f"{STORE_FORMAT_VERSION + 1} is newer than this retina reads (up to "
                       f"{STORE_FORMAT_VERSION}); upgrade retina")
    descriptor = json.loads((frozen / "package" / "retina.json").read_text())
    descriptor["schema_version"] = 2
    (frozen / "package" / "retina.json").write_text(json.dumps(descriptor))
    verify = run("models", "verify", frozen / "package")
    assert verify.exit_code != 0
    line = next(x for x in verify.output.splitlines() if "schema version" in x)
    assert str(frozen / "package" / "retina.json") in line
    assert "the package has schema version 2, this retina reads schema version 1" in line


def test_store_info_human_and_json(frozen, monkeypatch):
    result = run("store", "info", "--store", frozen / "store")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for needle in ("format version:   1", "rows:             4 (fundus 2, oct 2)", "shards:           1",
                   f"model:            {FROZEN_MODEL}", "embed dim:        4",
                   "recorded package: none", "created:          2026-11-30T13:40:32Z"):
        assert needle in text, needle
    payload = json.loads(run("store", "info", "--store", frozen / "store", "--json").stdout)
    assert payload["rows_per_modality"] == {"fundus": 2, "oct": 2} and payload["shards"] == 1
    assert payload["format_version"] == 1 and payload["embed_dim"] == 4
    assert payload["package"]["recorded"] is None and payload["package"]["found"] is False
    shutil.copytree(frozen / "package", Path("exported") / "toy")  # now findable by model id
    found = json.loads(run("store", "info", "--store", frozen / "store", "--json").stdout)["package"]
    assert found["found"] and found["how"] == "found by model id"
    assert Path(found["path"]).resolve() == (Path("exported") / "toy").resolve()
    missing = run("store", "info", "--store", frozen / "nothing")
    assert missing.exit_code != 0 and "no embedding store here" in missing.stderr
