"""The index backends (LanceDB, faiss, Qdrant local mode) against exact numpy search, called directly with
IndexedRows the tests build, plus one round through a real store and the registry.

Every backend must: build; update after a shard is added and one removed (a repeated delete is a
no-op); answer filtered queries with the top-k among matching rows (a pre-filter: a rare patient gets
all its rows), equal to exact search's, with cosine scores within 1e-5 of the exact ones; reach
recall@10 >= 0.95 on a clustered 20k x 128 set (LanceDB, faiss); refuse to open a missing index with
one line.
``lancedb-ivf`` is LanceDB with its vector index forced on at this size (by default a table below
MIN_INDEX_ROWS is searched by brute force, which is exact), so its ANN path is tested too.
Qdrant runs in the client's local mode only: no server is installable here.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from retinacli.errors import RetinaError
from retinacli.vector_index.base import IndexedRows, IndexInfo, row_key
from retinacli.vector_index.filters import Filter

DIM = 32
BACKENDS = ["lancedb", "lancedb-ivf", "faiss", "qdrant"]
_MODULES = {"lancedb": "lancedb", "lancedb-ivf": "lancedb", "faiss": "faiss", "qdrant": "qdrant_client"}


def _backend(which: str):
    if importlib.util.find_spec(_MODULES[which]) is None:
        pytest.skip(f"{_MODULES[which]} is not installed")
    from retinacli.vector_index import get_backend

    backend = get_backend(which.split("-")[0])
    if which == "lancedb-ivf":
        backend.min_index_rows = 500  # train IVF cells even on these small tables
    return backend


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return unit(centres[rng.integers(0, clusters, size=n)] + 0.35 * rng.normal(size=(n, dim)))


def shard_rows(shard: int, n: int, seed: int, dim: int = DIM,
               vectors: np.ndarray | None = None) -> IndexedRows:
    """One shard's rows with store-like metadata: both eyes and unknown, 40 patients plus a rare one
    (3 rows), dates over ten years with some unknown (0)."""
    rng = np.random.default_rng(seed)
    patient = [f"pt{int(p):03d}" for p in rng.integers(0, 40, size=n)]
    if shard == 0:
        patient[:3] = ["rare"] * 3
    date = (20140101 + 10000 * rng.integers(0, 10, size=n) + 100 * rng.integers(0, 12, size=n)
            + rng.integers(0, 28, size=n)).astype(np.int32)
    date[rng.random(n) < 0.1] = 0
    return IndexedRows(
        keys=row_key(shard, np.arange(n, dtype=np.int64)),
        vectors=vectors if vectors is not None else clustered(n, dim, 12, seed + 1000),
        laterality=list(rng.choice(["OD", "OS", ""], size=n, p=[0.45, 0.45, 0.1])),
        patient=patient,
        date=date,
    )


def concat(parts: list[IndexedRows]) -> IndexedRows:
    return IndexedRows(
        keys=np.concatenate([p.keys for p in parts]),
        vectors=np.concatenate([p.vectors for p in parts]),
        laterality=[v for p in parts for v in p.laterality],
        patient=[v for p in parts for v in p.patient],
        date=np.concatenate([p.date for p in parts]),
    )


def exact(rows: IndexedRows, queries: np.ndarray, k: int, where: Filter | None = None):
    """Exact (scores, keys) among rows matching ``where`` (Filter.mask, as exact search uses it)."""
    keep = np.ones(len(rows.keys), bool) if where is None else where.mask(rows.laterality, rows.patient,
                                                                           rows.date)
    keys, sims = rows.keys[keep], queries @ rows.vectors[keep].T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.full((len(queries), k), -np.inf, np.float32)
    found = np.full((len(queries), k), -1, np.int64)
    scores[:, : order.shape[1]] = np.take_along_axis(sims, order, axis=1)
    found[:, : order.shape[1]] = keys[order]
    return scores, found


def build(backend, folder, parts: list[IndexedRows], previous: IndexInfo | None = None,
          remove: list[int] = (), dim: int = DIM) -> IndexInfo:
    """An update as the registry does it, and the IndexInfo it would write."""
    params = backend.update(folder, "retina_0123456789ab_oct", previous, dim=dim, remove_shards=list(remove),
                            add=lambda: iter(parts), url=None, log=None)
    shards = sorted((set(previous.shards) if previous else set()) - set(remove)
                    | {int(p.keys[0]) >> 32 for p in parts})
    return IndexInfo(backend=backend.name, modality="oct", model_id="toy@1", embed_dim=dim, shards=shards,
                     vectors=0, built="now", params=params)


def search(backend, folder, info, queries, k, where=None):
    searcher = backend.open(folder, info)
    try:
        return searcher.search(queries, k, where)
    finally:
        if hasattr(searcher, "close"):  # Qdrant local mode locks its folder while open
            searcher.close()


@pytest.mark.parametrize("which", BACKENDS)
def test_build_then_update_adds_and_removes_shards_idempotently(which, tmp_path):
    backend = _backend(which)
    parts = [shard_rows(s, 300, seed=s) for s in range(4)]
    info = build(backend, tmp_path, parts)
    queries = np.concatenate([parts[1].vectors[:3], parts[3].vectors[:3]])
    scores, keys = search(backend, tmp_path, info, queries, 5)
    assert list(keys[:, 0]) == list(np.concatenate([parts[1].keys[:3], parts[3].keys[:3]]))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    # shard 1 leaves the store, shard 4 arrives: none of shard 1's keys may come back
    new = shard_rows(4, 300, seed=4)
    info = build(backend, tmp_path, [new], previous=info, remove=[1])
    assert info.shards == [0, 2, 3, 4]
    live = concat([parts[0], parts[2], parts[3], new])
    queries = np.concatenate([parts[1].vectors[:5], new.vectors[:3]])
    scores, keys = search(backend, tmp_path, info, queries, 10)
    assert not np.isin(keys, parts[1].keys).any()
    assert list(keys[5:, 0]) == list(new.keys[:3])
    _, exact_keys = exact(live, queries, 10)
    if which in ("lancedb", "qdrant"):  # brute force at this size: exact
        assert (keys == exact_keys).all()
    else:  # IVF cells (faiss always, lancedb-ivf forced): approximate
        assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(keys, exact_keys, strict=True)]) >= 0.9

    # a killed update is repaired by the next: the registry deletes the shards it is about to add
    # (shard 4 again) and shards already gone (1): deleting absent keys is a no-op, nothing doubles
    info = build(backend, tmp_path, [new], previous=info, remove=[1, 4])
    scores2, keys2 = search(backend, tmp_path, info, queries, 10)
    if which in ("lancedb", "qdrant"):  # exact: the same answer
        assert (keys2 == keys).all()
        np.testing.assert_allclose(scores2, scores, atol=1e-5)
    else:  # IVF cells may be retrained (k-means drawn afresh): approximate, as before the repair
        assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(keys2, exact_keys, strict=True)]) >= 0.9
        assert not np.isin(keys2, parts[1].keys).any() and list(keys2[5:, 0]) == list(new.keys[:3])
    assert all(len(set(row)) == 10 for row in keys2)  # no key twice

    # every shard gone: an empty index answers with pads only
    info = build(backend, tmp_path, [], previous=info, remove=[0, 2, 3, 4])
    scores, keys = search(backend, tmp_path, info, queries[:2], 3, Filter(laterality="OD"))
    assert (keys == -1).all() and np.isneginf(scores).all()


@pytest.fixture(scope="module")
def small_store_index(tmp_path_factory):
    """(backend, folder, info, rows) of a small store's 4000 rows, built once per backend."""
    built = {}

    def get(which: str):
        if which not in built:
            backend = _backend(which)
            folder = tmp_path_factory.mktemp(which)
            parts = [shard_rows(s, 800, seed=10 + s) for s in range(5)]
            built[which] = (backend, folder, build(backend, folder, parts), concat(parts))
        return built[which]

    return get


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("where", [
    Filter(laterality="OD"),
    Filter(patient="pt007"),
    Filter(date_from=20170101, date_to=20191231),
    Filter(date_to=20160630),
    Filter(date_from=20220101),
    Filter(laterality="OS", patient="pt012", date_from=20150101),
    Filter(patient="rare"),  # 3 rows: a post-filtered top-k would usually lose them
    Filter(patient="nobody"),
], ids=["eye", "patient", "date-range", "date-to", "date-from", "combined", "rare", "none-match"])
def test_filtered_search_is_exact_search_among_matching_rows(which, where, small_store_index):
    backend, folder, info, rows = small_store_index(which)
    queries = unit(np.random.default_rng(5).normal(size=(6, DIM)))
    k = 10
    scores, keys = search(backend, folder, info, queries, k, where)
    _, exact_keys = exact(rows, queries, k, where)
    matching = where.mask(rows.laterality, rows.patient, rows.date).sum()
    assert ((keys >= 0).sum(axis=1) == min(k, matching)).all()  # k results whenever k rows match
    assert (keys[exact_keys < 0] == -1).all() and np.isneginf(scores[exact_keys < 0]).all()
    if which == "lancedb-ivf" and where.patient is None:
        # approximate among matching rows (the narrow-filter probing): recall, not equality
        hits = np.mean([len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum())
                        for a, e in zip(keys, exact_keys, strict=True)])
        assert hits >= 0.95
        assert np.isin(keys[keys >= 0], rows.keys[where.mask(rows.laterality, rows.patient, rows.date)]).all()
    else:
        assert (keys == exact_keys).all()
    # the scores reported are the exact cosines of the rows returned
    by_key = dict(zip(rows.keys.tolist(), range(len(rows.keys)), strict=True))
    for q, row_keys, row_scores in zip(queries, keys, scores, strict=True):
        found = row_keys >= 0
        cosines = rows.vectors[[by_key[int(key)] for key in row_keys[found]]] @ q
        np.testing.assert_allclose(row_scores[found], cosines, atol=1e-5)
        assert np.all(np.diff(row_scores[found]) <= 1e-6)  # best first


# Not Qdrant: local mode is a brute-force scan (recall 1 by construction; its exactness is tested
# above) and inserts point by point (~50 s for 20k here); a server's HNSW recall is untested (no server).
@pytest.mark.parametrize("which", ["lancedb", "lancedb-ivf", "faiss"])
def test_recall_at_10_on_clustered_20k_x_128(which, tmp_path):
    backend = _backend(which)
    if which == "lancedb-ivf":
        backend.min_index_rows = 1000
    vectors = clustered(20_000, 128, 200, seed=3)
    parts = [shard_rows(s, 5000, seed=20 + s, dim=128, vectors=vectors[s * 5000:(s + 1) * 5000])
             for s in range(4)]
    info = build(backend, tmp_path, parts, dim=128)
    if which == "lancedb-ivf":
        assert info.params["index_type"] == "IVF_FLAT" and info.params["num_partitions"] == 141
        assert _cells_ranked(backend, tmp_path, info, vectors[0]) == 141  # 20 of 141 cells probed
    rows = concat(parts)
    queries = unit(vectors[np.random.default_rng(4).choice(20_000, 200, replace=False)]
                   + 0.05 * np.random.default_rng(5).normal(size=(200, 128)))
    scores, keys = search(backend, tmp_path, info, queries, 10)
    _, exact_keys = exact(rows, queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(keys, exact_keys, strict=True)])
    assert recall >= 0.95
    index_of = {int(key): i for i, key in enumerate(rows.keys)}
    cosines = np.einsum("qd,qkd->qk", queries, rows.vectors[[[index_of[int(x)] for x in r] for r in keys]])
    np.testing.assert_allclose(scores, cosines, atol=1e-5)
    # a filter keeping ~1/20 of the rows (one eye, two years): still the matching rows' top 10
    where = Filter(laterality="OD", date_from=20180101, date_to=20191231)
    scores, keys = search(backend, tmp_path, info, queries[:50], 10, where)
    _, exact_keys = exact(rows, queries[:50], 10, where)
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(keys, exact_keys, strict=True)]) >= 0.95


@pytest.mark.parametrize("which", BACKENDS)
def test_opening_a_missing_index_is_one_line(which, tmp_path):
    backend = _backend(which)
    info = build(backend, tmp_path / "built", [shard_rows(0, 50, seed=0)])
    with pytest.raises(RetinaError) as err:
        backend.open(tmp_path / "elsewhere", info)  # the files are not there
    assert "\n" not in str(err.value) and "index" in str(err.value)
    assert not (tmp_path / "elsewhere").exists()  # opening never creates anything


def test_lancedb_queries_see_the_version_their_description_names(tmp_path):
    """A reader holding the previous IndexInfo sees that version's rows, not a half-updated table; after
    a removal the earlier versions are gone, so removed rows stay in no version."""
    backend = _backend("lancedb")
    first = shard_rows(0, 200, seed=0)
    info1 = build(backend, tmp_path, [first])
    second = shard_rows(1, 200, seed=1)
    info2 = build(backend, tmp_path, [second], previous=info1)
    _, keys = search(backend, tmp_path, info1, second.vectors[:2], 1)
    assert not np.isin(keys, second.keys).any()  # version 1 does not hold shard 1 yet
    _, keys = search(backend, tmp_path, info2, second.vectors[:2], 1)
    assert list(keys[:, 0]) == list(second.keys[:2])
    info3 = build(backend, tmp_path, [], previous=info2, remove=[0])
    _, keys = search(backend, tmp_path, info3, first.vectors[:2], 5)
    assert not np.isin(keys, first.keys).any()
    with pytest.raises(RetinaError, match="cannot be opened"):  # cleaned up with the removal
        backend.open(tmp_path, info2)


def _cells_ranked(backend, folder, info, query) -> int:
    """How many IVF cells LanceDB ranks for a query: the cells the index really has."""
    import re

    table = backend.open(folder, info).table
    plan = table.search(query).distance_type("dot").nprobes(1).limit(1).analyze_plan()
    return int(re.search(r"partitions_ranked=(\d+)", plan).group(1))


def test_lancedb_trains_cells_from_its_threshold_retrains_on_growth_and_drops_them_when_small(tmp_path):
    backend = _backend("lancedb")
    backend.min_index_rows, backend.max_unindexed_rows = 1000, 100
    parts = [shard_rows(s, 400, seed=30 + s) for s in range(6)]
    rows = concat(parts)
    info = build(backend, tmp_path, parts[:2])  # 800 rows: brute force
    assert info.params["index_type"] == "none" and info.params["rows"] == 800
    info = build(backend, tmp_path, parts[2:4], previous=info)  # 1600: cells trained
    assert info.params["index_type"] == "IVF_FLAT" and info.params["trained_rows"] == 1600
    assert info.params["num_partitions"] == 40 and info.params["unindexed_rows"] == 0
    # the cells it was given are the cells it has (lancedb's optimize() would merge them into a few)
    assert _cells_ranked(backend, tmp_path, info, rows.vectors[0]) == 40
    backend.max_unindexed_rows = 500
    info = build(backend, tmp_path, parts[4:5], previous=info)  # 400 new rows <= 500: scanned beside
    assert info.params["trained_rows"] == 1600 and info.params["unindexed_rows"] == 400
    _, keys = search(backend, tmp_path, info, parts[4].vectors[:5], 1)
    assert (keys[:, 0] == parts[4].keys[:5]).all()  # the unindexed rows are found
    info = build(backend, tmp_path, parts[5:], previous=info)  # 800 unindexed > 500: trained again
    assert info.params["trained_rows"] == 2400 and info.params["num_partitions"] == 48
    assert _cells_ranked(backend, tmp_path, info, rows.vectors[0]) == 48
    queries = rows.vectors[::300]
    _, keys = search(backend, tmp_path, info, queries, 1)
    assert (keys[:, 0] == rows.keys[::300]).all()
    info = build(backend, tmp_path, [], previous=info, remove=[0, 1, 2, 3])  # 800 rows left
    assert info.params["index_type"] == "none" and info.params["rows"] == 800
    left = concat(parts[4:])
    _, keys = search(backend, tmp_path, info, queries, 10)
    assert (keys == exact(left, queries, 10)[1]).all()  # brute force again: exact


def test_lancedb_retrains_after_a_small_removal_from_one_full_scan(tmp_path):
    """Removing 1 shard of 12 leaves deleted rows inside the compacted fragment (below LanceDB's 10 %
    compaction threshold): the cells are trained from a sample the size of the table (one scan; a
    random sample crawls over deleted rows), and the removed rows are gone."""
    backend = _backend("lancedb")
    backend.min_index_rows = 500
    parts = [shard_rows(s, 6000, seed=40 + s, dim=8) for s in range(12)]  # > 256 rows a cell
    info = build(backend, tmp_path, parts, dim=8)
    assert info.params["sample_rate"] == 256 and info.params["num_partitions"] == 268
    info = build(backend, tmp_path, [], previous=info, remove=[5], dim=8)
    assert info.params["rows"] == 66000 and info.params["num_partitions"] == 256
    assert info.params["sample_rate"] == 259  # ceil(66000 rows / 256 cells) + 1: the whole table
    assert _cells_ranked(backend, tmp_path, info, parts[0].vectors[0]) == 256
    _, keys = search(backend, tmp_path, info, parts[5].vectors[:3], 10)
    assert not np.isin(keys, parts[5].keys).any()


@pytest.mark.parametrize("which", ["lancedb", "qdrant"])
def test_through_a_store_and_the_registry(which, tmp_path):
    """`retina store index --backend X` as the registry runs it: a current index, filtered `retrieve`
    results equal to exact search, stale after the store grows, current again after the update."""
    _backend(which)
    from retinacli.retrieval import search as store_search
    from retinacli.store import EmbeddingStore, StoreWriter
    from retinacli.vector_index import search_plan, update_indexes

    vectors = clustered(1500, DIM, 20, seed=7)
    rng = np.random.default_rng(8)

    def rows(start: int, n: int) -> list[dict]:
        return [{"id": f"i{start + i:05d}", "modality": "oct", "laterality": ["OD", "OS"][(start + i) % 2],
                 "patient": f"pt{int(rng.integers(0, 15)):02d}", "path": f"/data/{start + i}.dcm",
                 "date": f"20{rng.integers(15, 24)}-0{rng.integers(1, 10)}-1{rng.integers(0, 9)}"}
                for i in range(n)]

    root = tmp_path / "store"
    with StoreWriter.open_for_model(root, model_id="toy@0.1.0+000000000000", embed_dim=DIM,
                                    shard_rows=400) as writer:
        writer.add(rows(0, 1000), vectors[:1000])
    store = EmbeddingStore.open(root)
    assert update_indexes(store, which) == {"oct": 1000}
    assert search_plan(store, "auto", "oct") == ("ann", None)
    where = Filter(laterality="OS", date_from=20180101, date_to=20211231)
    for q in vectors[1000:1005]:
        got = store_search(store, q, target="oct", top_k=10, method="ann", where=where)
        want = store_search(store, q, target="oct", top_k=10, method="exact", where=where)
        assert [h.row["id"] for h in got] == [h.row["id"] for h in want] and len(got) == 10
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)

    with StoreWriter.open_for_model(root, model_id="toy@0.1.0+000000000000", embed_dim=DIM,
                                    shard_rows=400) as writer:
        writer.add(rows(1000, 500), vectors[1000:])
    store = EmbeddingStore.open(root)
    method, note = search_plan(store, "auto", "oct")
    assert method == "exact" and "out of date" in note and "shards added" in note
    assert update_indexes(store, which) == {"oct": 1500}
    assert search_plan(store, "auto", "oct") == ("ann", None)
    got = store_search(store, vectors[1200], target="oct", top_k=3, method="ann")
    assert got[0].row["id"] == "i01200" and got[0].score == pytest.approx(1.0, abs=1e-5)


def test_lancedb_delete_predicates_merge_consecutive_shards():
    from retinacli.vector_index.lancedb_index import delete_predicates

    assert delete_predicates([3, 1, 2, 7]) == [
        f"(key >= {1 << 32} AND key < {4 << 32}) OR (key >= {7 << 32} AND key < {8 << 32})"]
    assert delete_predicates([]) == []
    assert len(delete_predicates(list(range(0, 400, 2)), per_delete=64)) == 4  # 200 ranges, 64 a delete
