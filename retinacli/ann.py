"""Approximate nearest-neighbour search for large stores (optional extra ``retina[faiss]``, MIT).

Exact search (retinacli.retrieval) reads every vector of the target modality per query: at 1M x
512 float32 that is 2 GB of memory traffic, ~0.1-0.5 s per query on a laptop-class CPU. An inverted
file index (faiss ``IndexIVFFlat``, inner product) clusters the vectors into ``nlist`` cells with
k-means and scans only the ``nprobe`` cells nearest the query; the scores it returns are the exact
cosines of the vectors it visits, so only recall (not the scores) is approximate. Recall@10 against
exact search is measured by ``benchmarks/run.py`` and tested on a small synthetic store.

One index per modality lives in ``STORE/ann/<modality>.faiss`` with ``<modality>.json`` (which shards
it covers). Only writers build it: ``retina store index``, and ``retina embed`` after it commits (it
extends an existing index with the new shards, and builds one once the store reaches AUTO_MIN_ROWS).
Queries only read it, so a read-only command never writes into a store; a query finding no current
index (missing, or not covering every shard) searches exactly under ``auto`` and is refused under an
explicit ``ann``. Index ids are global store row numbers (store order).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import MissingExtraError, RetinaError
from retinacli.fsutil import atomic_path, atomic_write_text

ANN_DIR = "ann"
# `retrieve --search auto` switches to the index at this many vectors of the target modality.
AUTO_MIN_ROWS = 200_000
# Cells scanned per query: 16 of sqrt(N) cells gave recall@10 = 1.0 at 10k, 100k and 1M clustered 512-d
# vectors, with p50 8 ms at 1M on a loaded 2-core CPU (benchmarks/RESULTS.md).
DEFAULT_NPROBE = 16
TRAIN_POINTS_PER_CELL = 64  # k-means sample: enough for stable cells, cheap to train


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _faiss():
    if not faiss_available():
        raise MissingExtraError("approximate search (--search ann)", "faiss", "faiss")
    import faiss

    return faiss


def nlist_for(rows: int) -> int:
    """Cells for ``rows`` vectors: about sqrt(rows), at least 1, and never more cells than points/39
    (faiss's minimum for a meaningful k-means)."""
    return max(1, min(int(math.sqrt(max(rows, 1))), rows // 39 or 1))


def build_ivf(vectors: np.ndarray, ids: np.ndarray | None = None, nlist: int | None = None, seed: int = 0):
    """An IVF-Flat inner-product index over L2-normalised ``vectors`` (N, D) float32."""
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    nlist = nlist or nlist_for(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = min(n, nlist * TRAIN_POINTS_PER_CELL)
    train = x if sample == n else x[np.sort(rng.choice(n, size=sample, replace=False))]
    index.train(train)
    index.nprobe = min(DEFAULT_NPROBE, nlist)
    add(index, x, ids)
    return index


def add(index, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if ids is None:
        ids = np.arange(index.ntotal, index.ntotal + len(x), dtype=np.int64)
    index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))


def search_index(
    index, queries: np.ndarray, k: int, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, k), best first; ids are -1 where fewer than k vectors were visited."""
    faiss = _faiss()
    if nprobe is not None:
        index.nprobe = max(1, min(int(nprobe), index.nlist))
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if len(q) > 1:
        return index.search(q, int(k))
    # One query scans a few cells: OpenMP threads cost more than they save (and queue behind other
    # processes on a busy machine), so single queries run on the calling thread.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(q, int(k))
    finally:
        faiss.omp_set_num_threads(threads)


def exact_top_k(
    vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (scores, ids) of the k best rows for each query, scanning ``vectors`` (may be a
    memory map) in row blocks: one matrix product per block for all queries at once."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start in range(0, len(vectors), block):
        scores = q @ np.asarray(vectors[start : start + block], dtype=np.float32).T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        s = np.take_along_axis(scores, part, axis=1)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    return best_s, best_i


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of the exact top-k found by the approximate top-k."""
    k = exact_ids.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx_ids, exact_ids, strict=True)]))


def resolve_method(store, method: str) -> str:
    """``exact``, ``ann``, or ``auto``: ANN when faiss is installed and the store holds at least
    AUTO_MIN_ROWS vectors, else exact."""
    if method not in ("auto", "exact", "ann"):
        raise RetinaError(f"unknown search method {method!r} (use auto, exact or ann)")
    if method == "auto":
        return "ann" if faiss_available() and len(store) >= AUTO_MIN_ROWS else "exact"
    if method == "ann":
        _faiss()  # a clear one-line error when the extra is missing
    return method


# --- an index per store and modality -------------------------------------------------------------


def _paths(store, modality: str) -> tuple[Path, Path]:
    folder = Path(store.root) / ANN_DIR
    return folder / f"{modality}.faiss", folder / f"{modality}.json"


def _modality_rows(store, shard, modality: str) -> np.ndarray:
    kinds = store.shard_metadata(shard, ["modality"])["modality"]
    return np.flatnonzero(np.array([k == modality for k in kinds], dtype=bool))


def _read_index(store, modality: str):
    """(index, covered shard numbers) as stored, or (None, set()) when missing or unreadable."""
    faiss = _faiss()
    index_path, info_path = _paths(store, modality)
    if not (index_path.is_file() and info_path.is_file()):
        return None, set()
    try:
        info = json.loads(info_path.read_text())
        if info.get("model_id") != store.model_id:
            return None, set()
        return faiss.read_index(str(index_path)), {int(i) for i in info["shards"]}
    except (OSError, ValueError, RuntimeError, KeyError, TypeError):
        return None, set()  # unreadable: treated as missing, rebuilt by the next writer


def _current(store, modality: str):
    """(index, None) when the stored index covers exactly the committed shards, else (None, why)."""
    index, covered = _read_index(store, modality)
    shards = {s.index for s in store.shards}
    if index is not None and covered == shards:
        return index, None
    if index is None:
        return None, f"no {modality} ANN index"
    covers = f"covers {len(covered & shards)} of {len(shards)} shards"
    return None, f"the {modality} ANN index is out of date ({covers})"


def current_index(store, modality: str):
    """The store's index for ``modality`` when it covers exactly the committed shards; else a
    RetinaError saying why and how to build it. Only reads: queries never write into a store."""
    index, why = _current(store, modality)
    if index is None:
        raise RetinaError(f"{store.root}: {why}; build it with 'retina store index --store {store.root}' "
                          "(or search with --search exact)")
    return index


def search_plan(store, requested: str, target: str) -> tuple[str, str | None]:
    """The search method for a query of ``target`` items, and a one-line note when ``auto`` fell back.

    ``exact``: exact. ``ann``: the current index, or a RetinaError (no silent fallback: the user asked
    for it). ``auto``: ann when resolve_method picks it and a current index exists, else exact with a
    note naming the missing index."""
    method = resolve_method(store, requested)
    if method == "exact":
        return "exact", None
    if requested == "ann":
        current_index(store, target)  # refused with the reason and the command that fixes it
        return "ann", None
    index, why = _current(store, target)
    if index is None:
        return "exact", f"note: {why}, so the search is exact ('retina store index' builds it)"
    return "ann", None


def store_modalities(store) -> dict[str, int]:
    """Rows per modality in the committed shards."""
    counts: dict[str, int] = {}
    for shard in store.shards:
        for kind in store.shard_metadata(shard, ["modality"])["modality"]:
            counts[str(kind)] = counts.get(str(kind), 0) + 1
    return counts


def build_store_index(store, modality: str, log=None):
    """Build (or extend with newer shards) and write the store's index for ``modality``.

    Called only by writers holding the store's lock (``retina embed``, ``retina store index``).
    Returns the faiss index (ids = global row numbers). Written atomically, so a concurrent reader
    sees either the old or the new index file.
    """
    faiss = _faiss()
    index_path, info_path = _paths(store, modality)
    offsets, start = {}, 0
    for shard in store.shards:
        offsets[shard.index] = start
        start += shard.rows
    index, covered = _read_index(store, modality)
    if not covered <= set(offsets):
        index, covered = None, set()  # it covers shards the store no longer lists: ids would be wrong
    missing = [s for s in store.shards if s.index not in covered]
    if index is not None and not missing:
        return index
    if log:
        log(f"{'extending' if index is not None else 'building'} the {modality} ANN index "
            f"({sum(s.rows for s in missing)} rows to add)")
    parts, ids = [], []
    for shard in missing:
        rows = _modality_rows(store, shard, modality)
        if len(rows):
            parts.append(np.asarray(store.shard_vectors(shard)[rows], dtype=np.float32))
            ids.append(rows.astype(np.int64) + offsets[shard.index])
    vectors = np.concatenate(parts) if parts else np.zeros((0, store.embed_dim), np.float32)
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if index is None:
        if len(vectors) == 0:
            raise RetinaError(f"{store.root}: no {modality} vectors to index")
        index = build_ivf(vectors, all_ids)
    elif len(vectors):
        add(index, vectors, all_ids)
    index_path.parent.mkdir(exist_ok=True)
    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
    info = {"model_id": store.model_id, "shards": sorted(covered | {s.index for s in missing}),
            "nlist": int(index.nlist), "vectors": int(index.ntotal)}
    atomic_write_text(info_path, json.dumps(info, allow_nan=False) + "\n")
    return index


def update_store_indexes(store, log=None, build_all: bool = False) -> dict[str, int]:
    """Bring the store's ANN indexes up to date; returns {modality: vectors indexed} for those written.

    ``build_all`` (``retina store index``): every modality with vectors; needs faiss. Otherwise
    (``retina embed``): nothing without faiss; extend the indexes that exist, and build the missing
    ones once the store holds AUTO_MIN_ROWS vectors (where ``--search auto`` picks ann).
    """
    if not build_all and not faiss_available():
        return {}
    if not build_all and len(store) < AUTO_MIN_ROWS and not (Path(store.root) / ANN_DIR).is_dir():
        return {}  # small store, no index yet: nothing to read
    _faiss()
    built: dict[str, int] = {}
    for modality, count in sorted(store_modalities(store).items()):
        if not count:
            continue
        exists = all(p.is_file() for p in _paths(store, modality))
        if build_all or exists or len(store) >= AUTO_MIN_ROWS:
            built[modality] = int(build_store_index(store, modality, log=log).ntotal)
    return built


def rows_by_global_id(store, ids: list[int], columns: list[str]) -> dict[int, dict[str, Any]]:
    """Metadata rows for global row numbers, reading only the shards that hold them."""
    wanted: dict[int, list[int]] = {}
    start = 0
    bounds = []
    for shard in store.shards:
        bounds.append((start, start + shard.rows, shard))
        start += shard.rows
    for gid in ids:
        for lo, hi, shard in bounds:
            if lo <= gid < hi:
                wanted.setdefault(shard.index, []).append(gid)
                break
    out: dict[int, dict[str, Any]] = {}
    for lo, _hi, shard in bounds:
        if shard.index in wanted:
            meta = store.shard_metadata(shard, columns)
            for gid in wanted[shard.index]:
                out[gid] = {c: meta[c][gid - lo] for c in columns}
    return out
