"""The embedding store and the embedding pipeline, with small stand-ins for the engine and readers.

The stand-ins follow contract 3 (readers) and contract 6 (Engine); tests/test_embed_cli.py runs the
real readers and a real exported package end to end.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from retinacli.errors import ReadError, StoreBusyError
from retinacli.items import FundusImage, ImageMeta, OctVolume
from retinacli.pipeline import READER_NICENESS, plan_embedding, run_embedding
from retinacli.preprocess import make_spec, preprocess
from retinacli.privacy import SECRET_FILE
from retinacli.retrieval import search
from retinacli.store import EmbeddingStore, StoreModelMismatchError, StoreWriter, read_errors


class StandInEngine:
    """Contract-6 interface: a fixed random projection per modality, L2-normalised."""

    def __init__(self, model_id: str = "standin@0.1.0+000000000000", embed_dim: int = 8):
        self.model_id, self.name, self.version = model_id, "standin", "0.1.0"
        self.embed_dim = embed_dim
        self.spec = make_spec(oct_slices=2, oct_size=8, fundus_size=8)
        self.tasks = ["cst", "bcva"]
        rng = np.random.default_rng(0)
        self.weights = {"oct": rng.normal(size=(2 * 8 * 8, embed_dim)).astype(np.float32),
                        "fundus": rng.normal(size=(3 * 8 * 8, embed_dim)).astype(np.float32)}
        self.calls = 0

    def preprocess(self, item):
        return preprocess(item.modality, item.pixels, self.spec)

    def embed(self, modality, batch):
        self.calls += 1
        out = np.asarray(batch, np.float32).reshape(len(batch), -1) @ self.weights[modality]
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def predict(self, task, embeddings):
        z = np.asarray(embeddings) @ np.ones(self.embed_dim, np.float32)
        if task == "cst":
            return [{"task": task, "value": float(250 + 10 * v), "units": "µm"} for v in z]
        p = 1 / (1 + np.exp(-z))
        return [{"task": task, "probability": float(q), "label": int(q >= 0.5), "threshold": 0.5,
                 "label_meaning": "positive"} for q in p]


def standin_discover(paths):
    sources, errors = [], []
    for path in paths:
        sources.extend(sorted(path.glob("*.npy")) if path.is_dir() else [path])
    return sources, errors


def standin_read(source, modality):
    """npy: 3-D is an OCT volume, 2-D/3-channel a fundus; a 'bad' name is unreadable; laterality in name."""
    if "bad" in source.name:
        return [ReadError(source, "truncated pixel data")]
    pixels = np.load(source)
    lat = "OD" if "_OD" in source.name else "OS"
    meta = ImageMeta(laterality=lat, study_date="2024-01-02", patient_id="SYN000042")
    if pixels.ndim == 3 and pixels.shape[-1] != 3:
        items = [OctVolume(str(source), pixels, "npy", meta)]
    else:
        items = [FundusImage(str(source), pixels, "npy", meta)]
    return [i for i in items if modality is None or i.modality == modality]


def make_folder(root, n_pairs=5, bad=1):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n_pairs):
        lat = "OD" if i % 2 == 0 else "OS"
        np.save(root / f"eye{i}_{lat}_oct.npy", rng.integers(0, 255, (4, 16, 16), dtype=np.uint8))
        np.save(root / f"eye{i}_{lat}_fundus.npy", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for j in range(bad):
        (root / f"bad{j}.npy").write_bytes(b"not numpy")
    return root


def embed(folder, store_root, engine=None, shard_rows=3, batch_size=2, on_commit=None, workers=2):
    engine = engine or StandInEngine()
    with StoreWriter.open_for_model(store_root, model_id=engine.model_id, embed_dim=engine.embed_dim,
                                    shard_rows=shard_rows) as writer:
        writer.on_commit = on_commit
        plan = plan_embedding([folder], writer.secret, writer.column_values("source_key"),
                              exclude=store_root, discover=standin_discover)
        report = run_embedding(engine, plan, writer, batch_size=batch_size, workers=workers,
                               read_source=standin_read)
        writer.write_errors((e.path, e.reason) for e in report.errors)
    return report


def store_contents(store_root):
    store = EmbeddingStore.open(store_root)
    rows = store.metadata()
    vectors = store.vectors()
    return {row["id"]: (row, vectors[i]) for i, row in enumerate(rows)}, len(rows)


def test_embed_writes_shards_metadata_and_index(tmp_path):
    folder = make_folder(tmp_path / "data")
    report = embed(folder, tmp_path / "store")
    assert (report.embedded, report.skipped, report.failed) == (10, 0, 1)
    store = EmbeddingStore.open(tmp_path / "store")
    assert len(store) == 10 and store.model_id == "standin@0.1.0+000000000000"
    index = json.loads((tmp_path / "store" / "store.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [3, 3, 3, 1]  # whole sources, shard_rows=3
    for shard in store.shards:
        assert shard.embeddings.name == f"emb_{shard.index:05d}.npy"
        assert shard.metadata.name == f"meta_{shard.index:05d}.parquet"
        vectors = np.load(shard.embeddings)
        assert vectors.dtype == np.float32 and vectors.shape == (shard.rows, 8)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    rows = store.metadata()
    assert {r["modality"] for r in rows} == {"oct", "fundus"}
    assert all(r["id"].startswith("i") and len(r["id"]) == 17 for r in rows)
    assert len({r["id"] for r in rows}) == 10
    assert {r["patient"] for r in rows} == {rows[0]["patient"]} and rows[0]["patient"] != "SYN000042"
    assert all(r["patient_identifier"] is None for r in rows)
    assert {r["laterality"] for r in rows} == {"OD", "OS"} and {r["date"] for r in rows} == {"2024-01-02"}
    # Each vector is the engine's embedding of that row's file.
    engine = StandInEngine()
    vectors = store.vectors()
    for i, row in enumerate(rows):
        item = standin_read(Path(row["path"]), None)[0]
        expected = engine.embed(item.modality, engine.preprocess(item)[None])[0]
        np.testing.assert_allclose(vectors[i], expected, atol=1e-6)
    assert read_errors(tmp_path / "store") == [(str(folder / "bad0.npy"), "truncated pixel data")]


def test_second_run_embeds_nothing(tmp_path):
    folder = make_folder(tmp_path / "data")
    embed(folder, tmp_path / "store")
    engine = StandInEngine()
    report = embed(folder, tmp_path / "store", engine=engine)
    assert (report.embedded, report.skipped, report.failed) == (0, 10, 1)
    assert engine.calls == 0
    assert len(EmbeddingStore.open(tmp_path / "store")) == 10
    # A new file is picked up; the old ones are still skipped.
    np.save(folder / "eye9_OD_oct.npy", np.ones((4, 16, 16), np.uint8) * np.arange(16, dtype=np.uint8))
    report = embed(folder, tmp_path / "store")
    assert (report.embedded, report.skipped) == (1, 10)


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_store(tmp_path):
    folder = make_folder(tmp_path / "data", n_pairs=6)
    for name in ("full", "killed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / SECRET_FILE).write_text("ab" * 32)  # same secret -> comparable ids
    embed(folder, tmp_path / "full", shard_rows=2)

    def stop_after_first_shard(index):
        if index == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        embed(folder, tmp_path / "killed", shard_rows=2, on_commit=stop_after_first_shard)
    _, n_partial = store_contents(tmp_path / "killed")
    assert 0 < n_partial < 12
    report = embed(folder, tmp_path / "killed", shard_rows=2)
    assert report.skipped == n_partial and report.embedded == 12 - n_partial
    full, n_full = store_contents(tmp_path / "full")
    resumed, n_resumed = store_contents(tmp_path / "killed")
    assert n_full == n_resumed == 12  # no duplicates
    assert set(full) == set(resumed)
    for item_id, (row, vector) in full.items():
        assert resumed[item_id][0]["path"] == row["path"]
        np.testing.assert_allclose(resumed[item_id][1], vector, atol=1e-6)


def test_uncommitted_shard_files_are_invisible_and_cleaned(tmp_path):
    folder = make_folder(tmp_path / "data", n_pairs=2, bad=0)
    embed(folder, tmp_path / "store")
    root = tmp_path / "store"
    # What a run killed between writing vectors and updating the index leaves behind.
    np.save(root / "embeddings" / "emb_00099.npy", np.zeros((2, 8), np.float32))
    (root / "metadata" / ".meta_00099.parquet.tmp").write_bytes(b"partial")
    store = EmbeddingStore.open(root)
    assert len(store) == 4 and len(store.vectors()) == 4
    embed(folder, root)  # the next writer removes the debris
    assert not (root / "embeddings" / "emb_00099.npy").exists()
    assert not (root / "metadata" / ".meta_00099.parquet.tmp").exists()


def test_second_writer_is_refused(tmp_path):
    engine = StandInEngine()
    with (StoreWriter.open_for_model(tmp_path / "s", model_id=engine.model_id, embed_dim=8),
          pytest.raises(StoreBusyError, match="being written by retina pid")):
        StoreWriter.open_for_model(tmp_path / "s", model_id=engine.model_id, embed_dim=8)
    # Released on exit: a new writer gets in.
    StoreWriter.open_for_model(tmp_path / "s", model_id=engine.model_id, embed_dim=8).close()


def test_store_refuses_another_model(tmp_path):
    folder = make_folder(tmp_path / "data", n_pairs=1, bad=0)
    embed(folder, tmp_path / "store")
    other = StandInEngine(model_id="other@1.0.0+111111111111")
    with pytest.raises(StoreModelMismatchError, match=r"holds embeddings of model standin@0\.1\.0"):
        embed(folder, tmp_path / "store", engine=other)
    with pytest.raises(StoreModelMismatchError):
        EmbeddingStore.open(tmp_path / "store").require_model(other.model_id)
    # The refused writer released the lock.
    assert len(EmbeddingStore.open(tmp_path / "store")) == 2


def test_keep_identifiers_stores_the_raw_patient_id(tmp_path):
    folder = make_folder(tmp_path / "data", n_pairs=1, bad=0)
    engine = StandInEngine()
    with StoreWriter.open_for_model(tmp_path / "s", model_id=engine.model_id, embed_dim=8) as writer:
        plan = plan_embedding([folder], writer.secret, set(), discover=standin_discover)
        run_embedding(engine, plan, writer, keep_identifiers=True, read_source=standin_read)
    assert {r["patient_identifier"] for r in EmbeddingStore.open(tmp_path / "s").metadata()} == {"SYN000042"}


def test_search_filters_sorts_and_finds_itself(tmp_path):
    folder = make_folder(tmp_path / "data", n_pairs=6, bad=0)
    embed(folder, tmp_path / "store", shard_rows=4)
    store = EmbeddingStore.open(tmp_path / "store")
    rows, vectors = store.metadata(), store.vectors()
    query_row = next(i for i, r in enumerate(rows) if r["modality"] == "fundus")
    hits = search(store, vectors[query_row], target="oct", top_k=4)
    assert len(hits) == 4 and [h.rank for h in hits] == [1, 2, 3, 4]
    assert all(h.row["modality"] == "oct" for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    # Brute force agrees.
    oct_rows = [i for i, r in enumerate(rows) if r["modality"] == "oct"]
    expected = sorted(oct_rows, key=lambda i: -float(vectors[i] @ vectors[query_row]))[:4]
    assert [h.row["id"] for h in hits] == [rows[i]["id"] for i in expected]
    left = search(store, vectors[query_row], target="oct", laterality="OS", top_k=10)
    assert len(left) == 3 and {h.row["laterality"] for h in left} == {"OS"}
    itself = search(store, vectors[query_row], target="fundus", top_k=1)
    assert itself[0].row["id"] == rows[query_row]["id"] and itself[0].score == pytest.approx(1.0, abs=1e-5)


def test_reading_runs_in_worker_threads_with_a_bounded_window(tmp_path):
    """Decoding happens off the main thread, and at most 2 x workers sources are held at once."""
    import threading

    folder = make_folder(tmp_path / "data", n_pairs=12, bad=0)
    lock = threading.Lock()
    counts = {"started": 0, "done": 0, "max_held": 0}
    threads = set()

    def tracking_read(source, modality):
        with lock:
            counts["started"] += 1
            counts["max_held"] = max(counts["max_held"], counts["started"] - counts["done"])
            threads.add(threading.current_thread().name)
        return standin_read(source, modality)

    def done(_result):
        with lock:
            counts["done"] += 1

    engine = StandInEngine()
    with StoreWriter.open_for_model(tmp_path / "s", model_id=engine.model_id, embed_dim=8) as writer:
        plan = plan_embedding([folder], writer.secret, set(), discover=standin_discover)
        report = run_embedding(engine, plan, writer, workers=2, batch_size=4, read_source=tracking_read,
                               on_source_done=done)
    assert report.embedded == 24 and counts["done"] == 24
    assert threads and all(name.startswith("retina-read") for name in threads)
    assert counts["max_held"] <= 2 * 2 + 1  # the window, plus the one being batched
    assert engine.calls == 6  # 12 per modality in batches of 4


def test_a_model_failure_is_reported_and_retried_next_run(tmp_path):
    class FailsOnce(StandInEngine):
        def embed(self, modality, batch):
            if modality == "oct" and not getattr(self, "failed", False):
                self.failed = True
                raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT\nlong details")
            return super().embed(modality, batch)

    folder = make_folder(tmp_path / "data", n_pairs=3, bad=0)
    report = embed(folder, tmp_path / "store", engine=FailsOnce(), batch_size=2)
    assert report.embedded == 4 and report.failed == 2  # the first OCT batch of 2
    assert all(e.reason == "the model failed on it ([ONNXRuntimeError] : 2 : INVALID_ARGUMENT)"
               for e in report.errors)
    again = embed(folder, tmp_path / "store")
    assert (again.embedded, again.skipped, again.failed) == (2, 4, 0)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are a POSIX/Linux feature")
def test_decoder_threads_run_at_a_lower_cpu_priority_than_inference(tmp_path):
    folder = make_folder(tmp_path / "data")
    main_thread = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = []

    def reading(source, modality):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return standin_read(source, modality)

    engine = StandInEngine()
    store = tmp_path / "store"
    with StoreWriter.open_for_model(store, model_id=engine.model_id, embed_dim=engine.embed_dim) as w:
        plan = plan_embedding([folder], w.secret, set(), discover=standin_discover)
        report = run_embedding(engine, plan, w, workers=2, read_source=reading)
    assert report.embedded == 10
    assert seen and set(seen) == {min(19, main_thread + READER_NICENESS)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_thread  # inference unchanged
