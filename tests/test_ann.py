"""Approximate search with the faiss backend (retinacli.vector_index.faiss_index, faiss extra): recall
against exact search on a synthetic store, through the registry as `retrieve` uses it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

DIM = 32


def clustered_unit_vectors(n: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    x = centres[rng.integers(0, clusters, size=n)] + 0.35 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_store(root, vectors: np.ndarray, shard_rows: int = 1000):
    from retinacli.store import StoreWriter

    with StoreWriter.open_for_model(root, model_id="toy@0.1.0+000000000000", embed_dim=DIM,
                                    shard_rows=shard_rows) as writer:
        add_rows(writer, vectors, start=0)


def add_rows(writer, vectors: np.ndarray, start: int) -> None:
    rows = [
        {"id": f"i{start + i:06d}", "modality": "fundus" if (start + i) % 10 == 0 else "oct",
         "laterality": "OD" if (start + i) % 2 else "OS", "path": f"/data/{start + i}.dcm"}
        for i in range(len(vectors))
    ]
    writer.add(rows, vectors)


def test_ivf_recall_at_10_against_exact():
    from retinacli.vector_index.evaluate import exact_top_k, recall_at_k
    from retinacli.vector_index.faiss_index import build_ivf, search_index

    vectors = clustered_unit_vectors(6000, 40, seed=0)
    queries = clustered_unit_vectors(100, 40, seed=0)[:100] + 0.01
    index = build_ivf(vectors)
    _, approx = search_index(index, queries, 10)
    exact_scores, exact = exact_top_k(vectors, queries, 10, block=1000)  # several blocks merged
    assert recall_at_k(approx, exact) >= 0.97
    # exact_top_k is really exact: same as a full sort
    full = np.argsort(-(queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ vectors.T, axis=1)
    assert recall_at_k(exact, full[:, :10]) == 1.0
    assert np.all(np.diff(exact_scores, axis=1) <= 1e-6)


def test_store_ann_search_matches_exact_and_follows_new_shards(tmp_path):
    from retinacli.errors import RetinaError
    from retinacli.retrieval import search
    from retinacli.store import EmbeddingStore, StoreWriter
    from retinacli.vector_index import search_plan, update_indexes
    from retinacli.vector_index.evaluate import recall_at_k

    root = tmp_path / "store"
    vectors = clustered_unit_vectors(5000, 30, seed=1)
    write_store(root, vectors)
    store = EmbeddingStore.open(root)
    assert search_plan(store, "auto", "oct") == ("exact", None)  # small store, no index: exact, no note
    # A query never builds the index (read-only commands write nothing into a store): refused, no ann/.
    with pytest.raises(RetinaError, match="no oct ANN index; build it with 'retina store index"):
        search(store, clustered_unit_vectors(1, 30, seed=2)[0], target="oct", top_k=10, method="ann")
    assert not (root / "ann").exists()
    assert update_indexes(store, "faiss") == {"fundus": 500, "oct": 4500}
    assert search_plan(store, "auto", "oct") == ("ann", None)  # a current index is used
    queries = clustered_unit_vectors(30, 30, seed=2)
    recalls = []
    for q in queries:
        exact = search(store, q, target="oct", top_k=10)
        approx = search(store, q, target="oct", top_k=10, method="ann")
        assert all(h.row["modality"] == "oct" for h in approx)
        assert [h.rank for h in approx] == list(range(1, 11))
        # scores of the vectors it finds are exact cosines
        by_id = {h.row["id"]: h.score for h in exact}
        assert all(abs(by_id[h.row["id"]] - h.score) < 1e-5 for h in approx if h.row["id"] in by_id)
        recalls.append(recall_at_k(np.array([[h.row["id"] for h in approx]]),
                                   np.array([[h.row["id"] for h in exact]])))
    assert np.mean(recalls) >= 0.95
    assert (root / "ann" / "faiss" / "oct.json").is_file()

    # laterality filter and a shard committed after the index was built
    left = search(store, queries[0], target="oct", laterality="OS", top_k=5, method="ann")
    assert len(left) == 5 and {h.row["laterality"] for h in left} == {"OS"}
    newcomer = clustered_unit_vectors(1, 30, seed=99)
    with StoreWriter.open_for_model(root, model_id=store.model_id, embed_dim=DIM) as writer:
        add_rows(writer, newcomer, start=5001)  # odd row: OD, oct
    store = EmbeddingStore.open(root)
    # the new shard makes the index out of date: refused until a writer extends it
    with pytest.raises(RetinaError, match="faiss oct index is out of date \\(the store changed since it was "
                       "built: 1 shards added, 0 removed\\)"):
        search_plan(store, "ann", "oct")
    assert search_plan(store, "auto", "oct")[0] == "exact"
    assert update_indexes(store) == {"fundus": 500, "oct": 4501}  # the active backend, extended
    top = search(store, newcomer[0], target="oct", top_k=1, method="ann")
    assert top[0].row["id"] == "i005001" and top[0].score == pytest.approx(1.0, abs=1e-5)


def test_retrieve_cli_search_option(tmp_path):
    import json

    from typer.testing import CliRunner

    from retinacli.cli import app

    root = tmp_path / "store"
    write_store(root, clustered_unit_vectors(2000, 20, seed=3))
    runner = CliRunner()
    # explicit ann without an index: refused with a one-line hint, nothing written
    missing = runner.invoke(app, ["retrieve", "i000010", "--store", str(root), "--search", "ann"])
    assert missing.exit_code == 1 and "no oct ANN index; build it with 'retina store index" in missing.output
    assert not (root / "ann").exists()
    built = runner.invoke(app, ["store", "index", "--store", str(root), "--backend", "faiss", "--json"])
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout[built.stdout.index("{"):])["indexed"] == {"fundus": 200, "oct": 1800}
    outputs = {}
    for method in ("exact", "ann", "auto"):
        args = ["retrieve", "i000010", "--store", str(root), "--search", method, "--json"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout[result.stdout.index("{"):])
        assert payload["target"] == "oct"  # the query i000010 is a fundus row
        outputs[method] = payload
    assert outputs["auto"]["search"] == "ann"  # the index the user built is current: auto uses it
    assert outputs["ann"]["search"] == "ann" and (root / "ann" / "faiss" / "oct.json").is_file()
    assert outputs["ann"]["results"][0]["id"] == outputs["exact"]["results"][0]["id"]
    bad = runner.invoke(app, ["retrieve", "i000010", "--store", str(root), "--search", "fuzzy"])
    assert bad.exit_code == 2 and "unknown search method 'fuzzy'" in bad.output
