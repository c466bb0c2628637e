"""A damaged store is reported, never a traceback (issue 14, docs/store.md "Damaged stores").

A real store is built with `retina embed` (toy package, 10 sources in shards of 3 rows), copied per
test and damaged by hand: truncated, missing or extended shard files, a wrong dtype or embedding
size, a hand-edited store.json. `retrieve`, `predict`, `embed` and `store info` then stop with one
line and exit code 5, changing nothing; `retina store verify` names the shard and the problem;
`retina store repair` drops exactly the damaged shards, keeps every good vector, and the next
`retina embed` embeds exactly the dropped sources again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_cli import one_error_line
from fixtures_packages import make_toy_package
from test_crash_safety import N_SOURCES, write_inputs
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import EXIT_STORE_DAMAGED
from retinacli.privacy import SECRET_FILE
from retinacli.store import EmbeddingStore
from retinacli.storecheck import DAMAGED_HINT

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def files(root: Path) -> dict[str, str]:
    """Every file under `root` by content hash (what a command that changes nothing keeps)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}




pytestmark = pytest.mark.usefixtures("isolated_cli")  # tests/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    data = write_inputs(root / "data")
    package = make_toy_package(root / "toy")
    store = root / "store"
    result = cli("embed", data, "--model", package, "--store", store, "--shard-size", "3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["embedded"] == N_SOURCES
    assert len(EmbeddingStore.open(store).shards) >= 3
    return package, store, data


@pytest.fixture
def store_copy(built, tmp_path):
    package, store, data = built
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return package, copy, data


def _index(store: Path) -> dict:
    return json.loads((store / "store.json").read_text())


def _edit_index(store: Path, edit) -> None:
    index = _index(store)
    edit(index)
    (store / "store.json").write_text(json.dumps(index))


def _shard_files(store: Path, n: int) -> tuple[Path, Path]:
    entry = next(s for s in _index(store)["shards"] if s["index"] == n)
    return store / entry["embeddings"], store / entry["metadata"]


def truncate_npy(store):
    emb, _ = _shard_files(store, 1)
    emb.write_bytes(emb.read_bytes()[:-10])


def delete_parquet(store):
    _shard_files(store, 2)[1].unlink()


def npy_extra_row(store):
    emb, _ = _shard_files(store, 1)
    vectors = np.load(emb)
    np.save(emb, np.concatenate([vectors, vectors[:1]]))


def parquet_extra_row(store):
    _, meta = _shard_files(store, 1)
    table = pq.read_table(meta)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), meta)


def wrong_embed_dim(store):
    emb, _ = _shard_files(store, 0)
    vectors = np.load(emb)
    np.save(emb, np.concatenate([vectors, vectors[:, :1]], axis=1))


def wrong_dtype(store):
    emb, _ = _shard_files(store, 2)
    np.save(emb, np.load(emb).astype(np.float64))


def delete_npy(store):
    _shard_files(store, 0)[0].unlink()


def shard_rows_edited(store):
    _edit_index(store, lambda i: i["shards"][1].update(rows=2))


# name -> (damage, where the report points, words of the problem)
SHARD_DAMAGE = {
    "truncated npy": (truncate_npy, "shard 1", "truncated"),
    "missing parquet": (delete_parquet, "shard 2", "meta_00002.parquet is missing"),
    "missing npy": (delete_npy, "shard 0", "emb_00000.npy is missing"),
    "npy extra row": (npy_extra_row, "shard 1", "4 rows, store.json says 3"),
    "parquet extra row": (parquet_extra_row, "shard 1", "4 rows, store.json says 3"),
    "wrong embed dim": (wrong_embed_dim, "shard 0", "expected embed dim"),
    "wrong dtype": (wrong_dtype, "shard 2", "float64, expected float32"),
}
INDEX_DAMAGE = {
    "shards not a list": (lambda s: _edit_index(s, lambda i: i.update(shards="x")), "store.json",
                          "shards 'x' is not a list"),
    "not json": (lambda s: (s / "store.json").write_text("{\"format\": "), "store.json", "not valid JSON"),
    "embed_dim string": (lambda s: _edit_index(s, lambda i: i.update(embed_dim=str(i["embed_dim"]))),
                         "store.json", "is not a positive integer"),
    "model_id missing": (lambda s: _edit_index(s, lambda i: i.pop("model_id")), "store.json",
                         "model_id None"),
    "format_version string": (lambda s: _edit_index(s, lambda i: i.update(format_version="3")),
                              "store.json", "format_version '3'"),
    "rows total wrong": (lambda s: _edit_index(s, lambda i: i.update(rows=i["rows"] + 5)), "store.json",
                         "rows is"),
    "shard rows edited": (shard_rows_edited, "shard 1", "store.json says 2"),
    "store.json missing": (lambda s: (s / "store.json").unlink(), "store.json", "is missing"),
    # an entry that is unsound in itself is never opened: no traceback, nothing read outside the store
    "shard entry not an object": (lambda s: _edit_index(s, lambda i: i["shards"].__setitem__(1, 5)),
                                  "shards[1]", "the entry is not an object"),
    "shard outside the store": (
        lambda s: _edit_index(s, lambda i: i["shards"][1].update(index="y", embeddings="../../etc/passwd")),
        "shards[1]", "index 'y' is not a shard number"),
}
ALL_DAMAGE = {**SHARD_DAMAGE, **INDEX_DAMAGE}


def command_runs(package: Path, store: Path, data: Path) -> dict:
    return {
        "retrieve": cli("retrieve", data / "fundus0.png", "--store", store),
        "retrieve --model": cli("retrieve", data / "fundus0.png", "--store", store, "--model", package),
        "predict": cli("predict", "--task", "cst", "--store", store),
        "embed": cli("embed", data, "--store", store),
        "embed --model": cli("embed", data, "--model", package, "--store", store),
        "store info": cli("store", "info", "--store", store),
        "store index": cli("store", "index", "--store", store),
    }


@pytest.mark.parametrize("damage", sorted(ALL_DAMAGE))
def test_every_command_refuses_a_damaged_store_with_exit_5_and_changes_nothing(store_copy, damage):
    package, store, data = store_copy
    damage_fn, where, words = ALL_DAMAGE[damage]
    damage_fn(store)
    before = files(store)
    for name, result in command_runs(package, store, data).items():
        assert result.exit_code == EXIT_STORE_DAMAGED, (name, result.output)
        line = one_error_line(result)
        assert line.endswith(DAMAGED_HINT), (name, line)
        assert str(store) in line and where in line and words in line, (name, line)
    assert files(store) == before  # embed checked before appending: not even a lock file was written


@pytest.mark.parametrize("damage", sorted(ALL_DAMAGE))
def test_verify_names_the_shard_and_the_problem(store_copy, damage):
    _, store, _ = store_copy
    damage_fn, where, words = ALL_DAMAGE[damage]
    damage_fn(store)
    before = files(store)
    text = cli("store", "verify", "--store", store)
    assert text.exit_code == EXIT_STORE_DAMAGED, text.output
    assert "Traceback" not in text.output
    lines = text.stdout.splitlines()
    assert any(line.startswith(f"damaged: {where}: ") and words in line for line in lines), text.stdout
    report = cli("store", "verify", "--store", store, "--json")
    assert report.exit_code == EXIT_STORE_DAMAGED, report.output
    payload = json.loads(report.stdout)
    assert payload["healthy"] is False
    assert any(p["where"] == where and words in p["problem"] and p["damaged"] for p in payload["problems"])
    assert files(store) == before  # verify only reads


def test_verify_a_healthy_store(store_copy):
    _, store, _ = store_copy
    result = cli("store", "verify", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["healthy"] is True and payload["problems"] == []
    assert payload["shards"] == payload["shards_ok"] == len(EmbeddingStore.open(store).shards)
    assert cli("store", "verify", "--store", store).stdout.startswith("healthy:")


def _by_shard(store: Path) -> dict[int, tuple[list, np.ndarray, set]]:
    """shard number -> (ids, vectors, source keys), read straight from the files."""
    out = {}
    for entry in _index(store)["shards"]:
        meta = pq.read_table(store / entry["metadata"]).to_pydict()
        out[entry["index"]] = (meta["id"], np.load(store / entry["embeddings"]), set(meta["source_key"]))
    return out


@pytest.mark.parametrize("damage", [*sorted(SHARD_DAMAGE), "shard rows edited"])
def test_repair_drops_only_the_damaged_shard_and_embed_redoes_exactly_its_sources(store_copy, damage):
    _, store, data = store_copy
    damage_fn, where, _ = ALL_DAMAGE[damage]
    bad = int(where.split()[1])
    original = _by_shard(store)
    total = sum(len(ids) for ids, _, _ in original.values())
    # a derived index that covers every shard: it must go with the dropped shard
    (store / "ann").mkdir()
    (store / "ann" / "oct.json").write_text(json.dumps(
        {"model_id": _index(store)["model_id"], "shards": sorted(original), "nlist": 1, "vectors": 1}))
    damage_fn(store)

    result = cli("store", "repair", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [d["index"] for d in report["dropped"]] == [bad]
    assert "ann/" in report["removed"] and not (store / "ann").exists()
    assert report["healthy"] is True
    assert all(Path(store / m).is_file() for m in report["moved"])  # moved aside, not deleted
    assert report["moved"] and all(m.startswith("damaged/") for m in report["moved"])

    repaired = EmbeddingStore.open(store)  # opens again: healthy
    assert len(repaired) == report["rows"] == total - len(original[bad][0])
    now = _by_shard(store)
    assert sorted(now) == sorted(n for n in original if n != bad)
    for n, (ids, vectors, _) in now.items():  # every good vector kept, bit for bit
        assert ids == original[n][0]
        np.testing.assert_array_equal(vectors, original[n][1])
    assert cli("store", "verify", "--store", store).exit_code == 0

    again = cli("embed", data, "--store", store, "--json")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    redone = original[bad][2]
    assert summary["embedded"] == len(redone) and summary["skipped"] == N_SOURCES - len(redone)
    final = EmbeddingStore.open(store)
    ids = [m["id"] for m in final.metadata(["id"])]
    assert sorted(ids) == sorted(i for v in original.values() for i in v[0])  # same ids, no duplicates


def test_repairing_a_healthy_store_changes_nothing(store_copy):
    _, store, _ = store_copy
    before = files(store)
    result = cli("store", "repair", "--store", store)
    assert result.exit_code == 0, result.output
    assert "nothing to repair" in result.stdout
    assert files(store) == before


@pytest.mark.parametrize("damage", ["shards not a list", "not json", "embed_dim string",
                                    "store.json missing"])
def test_repair_refuses_a_broken_store_json_and_changes_nothing(store_copy, damage):
    _, store, _ = store_copy
    ALL_DAMAGE[damage][0](store)
    before = files(store)
    result = cli("store", "repair", "--store", store)
    assert result.exit_code == EXIT_STORE_DAMAGED, result.output
    line = one_error_line(result)
    assert "store.json" in line and "restore it from a backup" in line
    assert files(store) == before


def test_stray_temp_file_is_a_note_and_repair_removes_it(store_copy):
    _, store, _ = store_copy
    stray = store / "embeddings" / ".emb_00009.npy.123.tmp"
    stray.write_bytes(b"partial")
    result = cli("store", "verify", "--store", store)
    assert result.exit_code == 0, result.output
    assert "note: embeddings/.emb_00009.npy.123.tmp: stray" in result.stdout
    assert cli("store", "info", "--store", store).exit_code == 0  # debris does not stop reads
    repaired = cli("store", "repair", "--store", store, "--json")
    assert repaired.exit_code == 0, repaired.output
    assert json.loads(repaired.stdout)["removed"] == ["embeddings/.emb_00009.npy.123.tmp"]
    assert not stray.exists()


def test_verify_reports_a_missing_key_and_a_stale_ann_index(store_copy):
    _, store, _ = store_copy
    (store / SECRET_FILE).unlink()
    (store / "ann").mkdir()
    (store / "ann" / "oct.json").write_text(json.dumps(
        {"model_id": _index(store)["model_id"], "shards": [0, 99], "nlist": 1, "vectors": 1}))
    result = cli("store", "verify", "--store", store, "--json")
    assert result.exit_code == EXIT_STORE_DAMAGED, result.output
    where = {p["where"]: p["problem"] for p in json.loads(result.stdout)["problems"]}
    assert "restore it from a backup" in where["secret.key"]
    assert "[99]" in where["ann/oct"]
    repaired = cli("store", "repair", "--store", store, "--json")
    assert repaired.exit_code == EXIT_STORE_DAMAGED  # the key cannot be recreated: still damaged
    report = json.loads(repaired.stdout)
    assert report["dropped"] == [] and "ann/" in report["removed"]
    assert [p["where"] for p in report["problems"] if p["damaged"]] == ["secret.key"]


def test_verify_reads_every_value_and_repair_drops_a_shard_with_non_finite_vectors(store_copy):
    """A NaN inside a well-formed .npy passes the cheap checks of `open` but not `store verify`."""
    _, store, _ = store_copy
    emb, _ = _shard_files(store, 1)
    vectors = np.load(emb)
    vectors[0, 0] = np.nan
    np.save(emb, vectors)
    result = cli("store", "verify", "--store", store, "--json")
    assert result.exit_code == EXIT_STORE_DAMAGED, result.output
    [problem] = [p for p in json.loads(result.stdout)["problems"] if p["damaged"]]
    assert problem["where"] == "shard 1" and "non-finite" in problem["problem"]
    repaired = cli("store", "repair", "--store", store, "--json")
    assert repaired.exit_code == 0, repaired.output
    assert [d["index"] for d in json.loads(repaired.stdout)["dropped"]] == [1]


def test_verify_and_repair_of_no_store_are_usage_errors(tmp_path):
    for command in ("verify", "repair"):
        result = cli("store", command, "--store", tmp_path / "nothing")
        assert result.exit_code == 2, result.output
        assert "no embedding store here" in one_error_line(result)
    assert not (tmp_path / "nothing").exists()


def test_the_frozen_0_1_0_store_verifies_healthy():
    """Stores of older formats pass the same checks (verify only reads: the fixture is not changed)."""
    fixture = Path(__file__).parent / "fixtures" / "v0_1_0" / "store"
    before = files(fixture)
    result = cli("store", "verify", "--store", fixture, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["healthy"] is True
    assert files(fixture) == before
