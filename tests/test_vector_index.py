"""The search-index framework (retinacli.vector_index), the faiss backend and the CLI around them:
`retina store index --backend`, `retrieve --search / --patient / --date-from / --date-to`, `store info`,
and `store remove / prune / repair` keeping removed rows out of every index."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from retinacli.cli import app

pytest.importorskip("faiss")
# The Qdrant client warns (possibly later, from its own thread) when the server it was given is down:
# test_an_unreachable_qdrant_server_... means it to be.
pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version")

DIM = 24
MODEL = "toy@0.1.0+000000000000"
PATIENTS = 40
QUERY = f"i{10:016x}"  # a fundus row: its query searches oct items


def unit_vectors(n: int, seed: int, clusters: int = 25) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    x = centres[rng.integers(0, clusters, size=n)] + 0.4 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def patient(i: int) -> str:
    return f"p{i:012x}"


def make_rows(start: int, n: int) -> list[dict]:
    """Metadata as `retina embed` writes it: every 10th row fundus, eyes alternating, 40 patients (the
    last one rare: one row in 200), dates over 2015-2024, every 13th row without a date."""
    rows = []
    for i in range(start, start + n):
        who = PATIENTS - 1 if i % 200 == 7 else i % (PATIENTS - 1)
        rows.append({"id": f"i{i:016x}", "source_key": f"s{i}",
                     "modality": "fundus" if i % 10 == 0 else "oct",
                     "laterality": "OD" if i % 2 else "OS", "patient": patient(who), "path": f"/d/{i}.dcm",
                     "date": None if i % 13 == 0 else f"{2015 + i % 10}-{1 + i % 12:02d}-{1 + i % 28:02d}"})
    return rows


def write(root, start: int, n: int, seed: int, shard_rows: int = 1000) -> None:
    from retinacli.store import StoreWriter

    with StoreWriter.open_for_model(root, model_id=MODEL, embed_dim=DIM, shard_rows=shard_rows) as writer:
        writer.add(make_rows(start, n), unit_vectors(n, seed))


@pytest.fixture
def store_root(tmp_path):
    root = tmp_path / "store"
    write(root, 0, 3000, seed=0)
    return root


def cli(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def payload(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


# --- the registry -------------------------------------------------------------------------------------


def test_registry_names_backends_and_refuses_an_unknown_one(store_root):
    from retinacli.errors import UsageError
    from retinacli.privacy import load_secret
    from retinacli.store import EmbeddingStore
    from retinacli.vector_index import BACKEND_NAMES, default_backend, get_backend, index_name

    assert BACKEND_NAMES == ("lancedb", "faiss", "qdrant")
    backend = get_backend("faiss")
    assert (backend.name, backend.extra, backend.module) == ("faiss", "faiss", "faiss")
    assert default_backend() == "lancedb"  # installed here (the test extra)
    with pytest.raises(UsageError, match="unknown index backend 'annoy'"):
        get_backend("annoy")
    store = EmbeddingStore.open(store_root)
    name = index_name(store)
    assert name == index_name(EmbeddingStore.open(store_root)) and len(name) == len("retina_") + 12
    assert load_secret(store_root).hex()[:12] not in name  # keyed, reveals nothing of the key


def test_faiss_filters_are_the_exact_top_k_among_matching_rows(store_root, monkeypatch):
    """Pre-filtering: each filter's top 10 from the index equals exact search's, including a rare
    patient (15 rows: all 10 found, wherever they sit) and rows without a date (never match a bound)."""
    from retinacli.retrieval import search
    from retinacli.store import EmbeddingStore
    from retinacli.vector_index import Filter, open_searcher, update_indexes
    from retinacli.vector_index import faiss_index as fi

    store = EmbeddingStore.open(store_root)
    assert update_indexes(store, "faiss") == {"fundus": 300, "oct": 2700}
    searcher = open_searcher(store, "oct")
    queries = unit_vectors(12, seed=5)
    filters = [Filter(laterality="OD"), Filter(patient=patient(PATIENTS - 1)), Filter(patient=patient(3)),
               Filter(date_from=20180101, date_to=20191231), Filter(laterality="OS", date_from=20200601),
               Filter(laterality="OD", patient=patient(4), date_to=20211231), Filter(patient="pnobody")]
    rare = sum(r["patient"] == patient(PATIENTS - 1) and r["modality"] == "oct" for r in make_rows(0, 3000))
    assert rare >= 10
    for max_exact in (fi.EXACT_FILTER_MAX, 0):  # exact over few matching rows; the id selector in IVF
        monkeypatch.setattr(fi, "EXACT_FILTER_MAX", max_exact)
        for where in filters:
            for q in queries[:4]:
                exact = search(store, q, target="oct", top_k=10, where=where)
                found = search(store, q, target="oct", top_k=10, where=where, method="ann", searcher=searcher)
                assert all(where.mask([h.row["laterality"]], [h.row["patient"]],
                                      np.array([int((h.row["date"] or "0").replace("-", ""))]))[0]
                           for h in found)
                if where.patient == "pnobody":
                    assert exact == [] and found == []
                    continue
                assert len(found) == len(exact) == 10
                # scores are the exact cosines of the rows found
                by_id = {h.row["id"]: h.score for h in exact}
                assert all(abs(by_id[h.row["id"]] - h.score) < 1e-5 for h in found if h.row["id"] in by_id)
                same = len({h.row["id"] for h in found} & set(by_id))
                assert same == 10 if max_exact else same >= 9, (where, same)


def test_faiss_update_adds_and_deletes_by_shard_and_deletes_idempotently(tmp_path):
    from retinacli.vector_index import IndexedRows
    from retinacli.vector_index.base import IndexInfo, row_key
    from retinacli.vector_index.faiss_index import FaissBackend

    def rows(shard: int, n: int) -> IndexedRows:
        return IndexedRows(keys=row_key(shard, np.arange(n, dtype=np.int64)), vectors=unit_vectors(n, shard),
                           laterality=["OD"] * n, patient=[patient(shard)] * n,
                           date=np.full(n, 20200101, np.int32))

    backend, folder = FaissBackend(), tmp_path / "faiss"

    def update(previous, remove, add):
        params = backend.update(folder, "retina_x_oct", previous, dim=DIM, remove_shards=remove,
                                add=lambda: iter(add), url=None, log=None)
        return IndexInfo("faiss", "oct", MODEL, DIM, [], 0, "now", params)

    first = update(None, [], [rows(0, 300), rows(1, 200)])
    second = update(first, [0, 2], [rows(2, 50)])  # shard 2 is not there yet: deleting it is a no-op
    again = update(first, [0, 2], [rows(2, 50)])  # a killed update's redo from the same previous state
    for info in (second, again):
        searcher = backend.open(folder, info)
        assert searcher.index.ntotal == 250
        _, keys = searcher.search(unit_vectors(5, 9), 250)
        shards = {int(k) >> 32 for k in keys.ravel() if k >= 0}
        assert shards == {1, 2}
    third = update(again, [1], [])
    assert backend.open(folder, third).index.ntotal == 50
    emptied = update(third, [2], [])
    scores, keys = backend.open(folder, emptied).search(unit_vectors(2, 1), 3)
    assert (keys == -1).all() and np.isneginf(scores).all()
    # until the registry commits the description, the generation it names stays; then it goes
    assert len(list(folder.glob("*.columns.npz"))) == 2
    backend.committed(folder, emptied)
    assert [p.name for p in folder.iterdir()] == [emptied.params["columns"]]


def test_faiss_index_grows_and_retrains_its_cells(tmp_path):
    from retinacli.store import EmbeddingStore
    from retinacli.vector_index import read_info, update_indexes

    root = tmp_path / "store"
    write(root, 0, 200, seed=1)
    update_indexes(EmbeddingStore.open(root), "faiss")
    small = read_info(EmbeddingStore.open(root), "faiss", "oct").params
    write(root, 200, 4000, seed=2)
    assert update_indexes(EmbeddingStore.open(root)) == {"fundus": 420, "oct": 3780}
    grown = read_info(EmbeddingStore.open(root), "faiss", "oct").params
    assert small["nlist"] == 4 and grown["nlist"] == 61 and grown["trained_on"] == 3780


def test_faiss_calibrates_the_cells_it_scans_to_the_recall_target(tmp_path):
    """Well-separated vectors keep the default 16 cells; overlapping ones get more, so that held-out
    queries (not stored vectors) still find >= 0.95 of the exact top 10 where 16 cells find < 0.8."""
    from retinacli.vector_index import IndexedRows
    from retinacli.vector_index.base import IndexInfo, row_key
    from retinacli.vector_index.evaluate import exact_top_k, recall_at_k
    from retinacli.vector_index.faiss_index import DEFAULT_NPROBE, FaissBackend, search_index

    found = {}
    for noise in (0.3, 2.0):
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(200, DIM))
        x = centres[rng.integers(0, 200, 20000)] + noise * rng.normal(size=(20000, DIM))
        q = centres[rng.integers(0, 200, 100)] + noise * rng.normal(size=(100, DIM))
        x, q = ((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32) for v in (x, q))
        rows = IndexedRows(row_key(0, np.arange(20000, dtype=np.int64)), x, [""] * 20000, [""] * 20000,
                           np.zeros(20000, np.int32))
        folder = tmp_path / str(noise)
        params = FaissBackend().update(folder, "t", None, dim=DIM, remove_shards=[],
                                       add=lambda r=rows: iter([r]), url=None, log=None)
        searcher = FaissBackend().open(folder, IndexInfo("faiss", "oct", MODEL, DIM, [0], 20000, "", params))
        _, exact = exact_top_k(x, q, 10)
        _, approx = searcher.search(q, 10)
        _, default = search_index(searcher.index, q, 10, nprobe=DEFAULT_NPROBE)
        found[noise] = (params["nprobe"], recall_at_k(approx, exact), recall_at_k(default, exact))
        assert params["calibrated_recall"] >= 0.95
    assert found[0.3] == (16, 1.0, 1.0)
    nprobe, calibrated, default = found[2.0]
    assert nprobe > 16 and calibrated >= 0.95 and default < 0.8


# --- the CLI ------------------------------------------------------------------------------------------


def test_store_index_info_and_retrieve_filters_on_the_cli(store_root):
    from retinacli.store import StoreWriter

    assert cli("retrieve", QUERY, "--store", store_root, "--search", "ann").exit_code == 1  # no index yet
    built = payload(cli("store", "index", "--store", store_root, "--backend", "faiss", "--json"))
    assert built == {"store": str(store_root), "backend": "faiss", "indexed": {"fundus": 300, "oct": 2700}}
    info = payload(cli("store", "info", "--store", store_root, "--json"))["indexes"]
    assert [(i["backend"], i["modality"], i["vectors"], i["current"], i["active"]) for i in info] == \
        [("faiss", "fundus", 300, True, True), ("faiss", "oct", 2700, True, True)]
    text = cli("store", "info", "--store", store_root)
    assert "index faiss oct:" in text.stdout and "2700 vectors, current" in text.stdout

    query = QUERY
    rare = patient(PATIENTS - 1)
    for flags in (["--patient", rare], ["--laterality", "od", "--date-from", "2018-01-01", "--date-to",
                                         "2019-12-31"]):
        answers = {m: payload(cli("retrieve", query, "--store", store_root, "--search", m, "-k", "10",
                                  "--json", *flags)) for m in ("exact", "ann")}
        assert answers["ann"]["search"] == "ann" and answers["exact"]["search"] == "exact"
        ids = {m: [r["id"] for r in a["results"]] for m, a in answers.items()}
        assert len(ids["ann"]) == 10 and ids["ann"] == ids["exact"]
        if flags[0] == "--patient":
            rows = {r["id"]: r for r in make_rows(0, 3000)}
            assert {rows[i]["patient"] for i in ids["ann"]} == {rare}
        else:
            assert all(r["laterality"] == "OD" and "2018-01-01" <= r["date"] <= "2019-12-31"
                       for r in answers["ann"]["results"])
    bad = cli("retrieve", query, "--store", store_root, "--date-from", "2019-13-01")
    assert bad.exit_code == 2 and "--date-from must be a date as YYYY-MM-DD, not '2019-13-01'" in bad.output
    backwards = cli("retrieve", query, "--store", store_root, "--date-from", "2020-01-01", "--date-to",
                    "2019-01-01")
    assert backwards.exit_code == 2 and "is after --date-to" in backwards.output
    url = cli("store", "index", "--store", store_root, "--backend", "faiss", "--url", "http://localhost:6333")
    assert url.exit_code == 2 and "--url names a Qdrant server" in url.output
    unknown = cli("store", "index", "--store", store_root, "--backend", "annoy")
    assert unknown.exit_code == 2 and "--backend must be one of lancedb, faiss, qdrant" in unknown.output

    # a shard committed by a writer that does not update indexes: stale, said by info and by auto
    with StoreWriter.open_for_model(store_root, model_id=MODEL, embed_dim=DIM) as writer:
        writer.add(make_rows(5000, 20), unit_vectors(20, seed=7))
    info = payload(cli("store", "info", "--store", store_root, "--json"))["indexes"]
    assert {i["why"] for i in info} == {"the store changed since it was built: 1 shards added, 0 removed"}
    auto = cli("retrieve", query, "--store", store_root, "--json")
    assert json.loads(auto.stdout)["search"] == "exact"
    assert "note: the faiss oct index is out of date (the store changed since it was built: 1 shards " \
           "added, 0 removed), so the search is exact; 'retina store index' updates it" in auto.stderr
    again = payload(cli("store", "index", "--store", store_root, "--json"))  # the active backend, updated
    assert again["backend"] == "faiss" and again["indexed"] == {"fundus": 302, "oct": 2718}
    assert payload(cli("retrieve", query, "--store", store_root, "--json"))["search"] == "ann"


def test_auto_suggests_an_index_for_a_large_store(store_root, monkeypatch):
    from retinacli import vector_index

    monkeypatch.setattr(vector_index, "AUTO_MIN_ROWS", 2000)  # as if 2,700 oct rows were many
    result = cli("retrieve", QUERY, "--store", store_root, "--json")
    assert json.loads(result.stdout)["search"] == "exact"
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: the store holds no oct index, so the search is exact; 'retina store index "
                     f"--store {store_root}' builds one (faster at this size)"]
    assert not (store_root / "ann").exists()  # a query never builds one


@pytest.mark.parametrize("backend", ["faiss", "lancedb", "qdrant"])
def test_store_remove_leaves_no_row_of_the_patient_in_any_index(store_root, backend):
    """Every backend's index holds none of the removed patient's rows afterwards, and is current."""
    from retinacli.store import EmbeddingStore
    from retinacli.vector_index import Filter, get_backend, index_status, open_searcher, rows_for_keys

    pytest.importorskip(get_backend(backend).module)
    others = [b for b in ("faiss", "lancedb") if b != backend]
    for name in [*others, backend]:  # several indexes at once; the last one built is active
        assert cli("store", "index", "--store", store_root, "--backend", name).exit_code == 0
    gone = patient(5)
    # The raw float32 bytes of the patient's OCT vectors: present in the backend's files before the removal.
    store = EmbeddingStore.open(store_root)
    kept = [(v, m) for _s, vs, ms in store.iter_shards(["patient", "modality"])
            for v, m in zip(vs, zip(ms["patient"], ms["modality"], strict=True), strict=True)]
    needles = [np.asarray(v, dtype=np.float32).tobytes() for v, (who, kind) in kept
               if who == gone and kind == "oct"]

    def holds_a_vector_of_the_patient() -> bool:
        files = [f for f in (store_root / "ann" / backend).rglob("*") if f.is_file()]
        return any(needle in f.read_bytes() for f in files for needle in needles)

    found_before = holds_a_vector_of_the_patient()
    assert found_before or backend == "qdrant"  # qdrant's local mode may store vectors in another encoding
    removed = payload(cli("store", "remove", "--patient", gone, "--store", store_root, "--json"))
    assert removed["rows_removed"] == 77 and removed["index"] == "updated"
    if found_before:  # a local index is rebuilt: no deleted row survives in its files
        assert not holds_a_vector_of_the_patient()
    assert set(removed["indexes"].values()) == {"updated"} and backend in removed["indexes"]
    store = EmbeddingStore.open(store_root)
    status = index_status(store)
    assert status and all(s["current"] for s in status)
    assert {s["backend"] for s in status if s["active"]} == {backend}
    searcher = open_searcher(store, "oct")
    queries = unit_vectors(20, seed=11)
    _, keys = searcher.search(queries, 50, Filter(patient=gone))
    assert (keys == -1).all()  # not one row of the patient is left to find
    _, keys = searcher.search(queries, 200)
    rows = rows_for_keys(store, keys.ravel(), ["patient"])
    assert len(rows) == len({int(k) for k in keys.ravel() if k >= 0}) > 200  # every key names a stored row
    assert gone not in {r["patient"] for r in rows.values()}
    getattr(searcher, "close", lambda: None)()  # a local Qdrant allows one client at a time
    listed = payload(cli("retrieve", QUERY, "--store", store_root, "--search", "ann", "-k", "3000",
                         "--json"))
    assert listed["search"] == "ann" and len(listed["results"]) == 2700 - 69
    assert not [r for r in make_rows(0, 3000) if r["patient"] == gone and r["id"] in
                {x["id"] for x in listed["results"]}]


def test_a_broken_extra_means_the_local_index_is_deleted_not_left_holding_removed_rows(store_root, tmp_path):
    """`store remove` when the faiss index cannot be updated (its library fails to import): the folder
    goes, with a note, and the summary says so."""
    assert cli("store", "index", "--store", store_root, "--backend", "faiss").exit_code == 0
    broken = tmp_path / "broken" / "faiss"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('faiss is broken here')\n")
    env = {**os.environ, "PYTHONPATH": f"{broken.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-m", "retinacli.cli", "store", "remove", "--patient", patient(5),
                          "--store", str(store_root), "--json"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert summary["index"] == "dropped" and summary["indexes"] == {"faiss": "dropped"}
    assert "note: the faiss index was deleted (ImportError: faiss is broken here)" in run.stderr
    assert not (store_root / "ann" / "faiss").exists() and not (store_root / "ann" / "active.json").exists()


def test_an_unreachable_qdrant_server_is_a_loud_warning_and_the_index_is_stale(store_root):
    from retinacli.store import EmbeddingStore
    from retinacli.vector_index import read_info, search_plan

    pytest.importorskip("qdrant_client")
    assert cli("store", "index", "--store", store_root, "--backend", "qdrant").exit_code == 0
    # as if it had been built on a server that is now down (nothing listens on port 9 here)
    path = store_root / "ann" / "qdrant" / "oct.json"
    info = json.loads(path.read_text())
    info["params"]["url"] = "http://127.0.0.1:9"
    path.write_text(json.dumps(info))
    result = cli("store", "remove", "--patient", patient(5), "--store", store_root, "--json")
    summary = payload(result)
    assert summary["index"] == "stale" and summary["indexes"]["qdrant"] == "stale"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "http://127.0.0.1:9" in warnings[0] and "still holds the removed rows" \
        in warnings[0]
    store = EmbeddingStore.open(store_root)
    assert read_info(store, "qdrant", "oct").shards != [s.index for s in store.shards]
    method, note = search_plan(store, "auto", "oct")
    assert method == "exact" and "out of date" in note


def test_verify_and_repair_with_indexes(store_root):
    """An index holding rows of a shard the store no longer lists is damage (removed rows must not stay);
    repair updates it. One that only lacks a newer shard is a note. A legacy index is never used."""
    from retinacli.store import EmbeddingStore
    from retinacli.vector_index import index_status, search_plan

    write(store_root, 4000, 500, seed=3)  # a second shard
    assert cli("store", "index", "--store", store_root, "--backend", "faiss").exit_code == 0
    path = store_root / "ann" / "faiss" / "oct.json"
    info = json.loads(path.read_text())
    info["shards"] = [*info["shards"], 99]
    path.write_text(json.dumps(info))
    report = json.loads(cli("store", "verify", "--store", store_root, "--json").stdout)
    assert report["healthy"] is False
    problems = {p["where"]: p["problem"] for p in report["problems"]}
    assert "stale: covers shards [99]" in problems["ann/faiss/oct"]
    repaired = payload(cli("store", "repair", "--store", store_root, "--json"))
    assert repaired["healthy"] is True and repaired["indexes"] == {"faiss": "updated"}
    store = EmbeddingStore.open(store_root)
    assert all(s["current"] for s in index_status(store))

    write(store_root, 6000, 10, seed=4)
    report = json.loads(cli("store", "verify", "--store", store_root, "--json").stdout)
    assert report["healthy"] is True
    assert "index out of date: 1 shards added" in {p["where"]: p["problem"] for p in report["problems"]}[
        "ann/faiss/oct"]

    # an earlier retina's index (STORE/ann/oct.faiss + oct.json) is listed, never searched, and replaced
    legacy = store_root / "ann" / "oct.json"
    legacy.write_text(json.dumps({"model_id": MODEL, "shards": [s.index for s in store.shards], "nlist": 1,
                                  "vectors": 1}))
    (store_root / "ann" / "oct.faiss").write_bytes(b"old")
    store = EmbeddingStore.open(store_root)
    listed = {(s["backend"], s["modality"], s["current"]) for s in index_status(store)}
    assert ("legacy", "oct", False) in listed
    assert search_plan(store, "auto", "oct")[0] == "exact"  # the faiss index is stale, the legacy one unused
    assert cli("store", "index", "--store", store_root).exit_code == 0
    assert not legacy.exists() and not (store_root / "ann" / "oct.faiss").exists()
    assert search_plan(EmbeddingStore.open(store_root), "auto", "oct") == ("ann", None)


def test_embed_updates_the_active_index_and_a_failure_is_one_note(tiny_cohort, tmp_path, isolated_cli):
    """`retina embed` after its commit: the active index follows the new shard; when the update fails
    (here: the faiss library fails to import) the vectors stay committed, one note says so, and
    retrieve falls back to exact search."""
    import shutil

    from fixtures_packages import make_toy_package

    from retinacli.store import EmbeddingStore
    from retinacli.vector_index import read_info, search_plan

    pytest.importorskip("onnx")
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    package = make_toy_package(tmp_path / "toy")
    store = tmp_path / "store"
    files = sorted(cohort.rglob("*.dcm"))
    parts = [tmp_path / "part1", tmp_path / "part2"]
    for part, chosen in zip(parts, (files[:3], files[3:6]), strict=True):
        part.mkdir()
        for path in chosen:
            shutil.copy(path, part / path.name)
    assert cli("embed", parts[0], "--model", package, "--store", store).exit_code == 0
    assert cli("store", "index", "--store", store, "--backend", "faiss").exit_code == 0
    assert cli("embed", parts[1], "--model", package, "--store", store).exit_code == 0
    opened = EmbeddingStore.open(store)
    assert len(opened.shards) == 2  # the second embed committed a shard, and the index followed it
    assert read_info(opened, "faiss", "oct").shards == [s.index for s in opened.shards]
    assert search_plan(opened, "auto", "oct") == ("ann", None)

    broken = tmp_path / "broken" / "faiss"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('faiss is broken here')\n")
    env = {**os.environ, "PYTHONPATH": f"{broken.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-m", "retinacli.cli", "embed", str(cohort), "--model",
                          str(package), "--store", str(store)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    notes = [line for line in run.stderr.splitlines() if "search index was not updated" in line]
    assert notes == ["note: the search index was not updated (ImportError: faiss is broken here); retrieve "
                     "searches exactly until 'retina store index' updates it"]
    opened = EmbeddingStore.open(store)
    assert len(opened.shards) == len(read_info(opened, "faiss", "oct").shards) + 1  # committed, not indexed
    method, note = search_plan(opened, "auto", "oct")
    assert method == "exact" and "1 shards added, 0 removed" in note
