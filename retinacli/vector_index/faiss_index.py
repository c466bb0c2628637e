"""The faiss backend (optional extra ``retina[faiss]``, MIT): an inverted-file index in one local file.

Exact search reads every vector of the target modality per query: at 1M x 512 float32 that is 2 GB
of memory traffic, ~0.1-0.5 s per query on a laptop-class CPU. ``IndexIVFFlat`` (inner product)
clusters the vectors into ``nlist`` cells with k-means and scans only the ``nprobe`` cells nearest the
query; the scores it returns are the exact cosines of the vectors it visits, so only recall (not the
scores) is approximate. Recall@10 against exact search is tested (tests/test_ann.py,
tests/test_index_backends.py) and measured (benchmarks/index_scale.py).

Files in ``STORE/ann/faiss/``, per modality: ``<name>.<generation>.faiss`` (the index, keys = base.row_key)
and ``<name>.<generation>.columns.npz`` (keys and the filter columns: eye, patient, date). An update
writes a new generation and the IndexInfo names it (the commit point), so a killed update leaves the
previous pair in use; the previous pair is deleted once the new description is written. Filters
become an id selector applied while scanning (pre-filtering: the top k among the matching rows); a
filter matching few rows is answered exactly over those rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import RetinaError, require
from retinacli.vector_index.base import ROW_BITS, IndexedRows, IndexInfo
from retinacli.vector_index.filters import Filter

# Cells scanned per query, at least: 16 of sqrt(N) cells gave recall@10 = 1.0 at 10k, 100k and 1M
# clustered 512-d vectors, with p50 8 ms at 1M on a loaded 2-core CPU (benchmarks/RESULTS.md). Less
# separated vectors need more: each (re)build calibrates nprobe on its own vectors (calibrate_nprobe).
DEFAULT_NPROBE = 16
TARGET_RECALL = 0.95  # recall@10 against exact search that the calibrated nprobe reaches
CALIBRATION_QUERIES = 100
TRAIN_POINTS_PER_CELL = 64  # k-means sample: enough for stable cells, cheap to train
# A filter matching at most this many rows is answered exactly over them (their vectors read back from
# the index): a rare patient's rows may sit in cells the query never probes.
EXACT_FILTER_MAX = 20_000
WIDE_MAX = 2048  # a filtered query first reads at most this many unfiltered results (_filtered)
RETRAIN_GROWTH = 4  # cells are trained again once the index holds 4x the vectors they were trained on
# A filter keeping a share s of the rows scans nprobe * s**-FILTER_PROBE_EXPONENT cells: fewer matching
# rows per cell, so more cells hold the top k among them (recall@10 >= 0.95 at 1/20 selectivity).
FILTER_PROBE_EXPONENT = 0.75
_EYES = {"OD": 1, "OS": 2}


def _faiss():
    require("the faiss index", "faiss", "faiss")
    import faiss

    return faiss


def nlist_for(rows: int) -> int:
    """Cells for ``rows`` vectors: about sqrt(rows), at least 1, and never more cells than points/39
    (faiss's minimum for a meaningful k-means)."""
    return max(1, min(int(math.sqrt(max(rows, 1))), rows // 39 or 1))


def build_ivf(vectors: np.ndarray, ids: np.ndarray | None = None, nlist: int | None = None, seed: int = 0):
    """An IVF-Flat inner-product index over L2-normalised ``vectors`` (N, D) float32, ids ``ids``
    (default 0..N-1), with a hash-table id map (rows can be read back and removed by id)."""
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    nlist = nlist or nlist_for(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # a small store's few points train its one cell: no stderr warning
    rng = np.random.default_rng(seed)
    sample = min(n, nlist * TRAIN_POINTS_PER_CELL)
    train = x if sample == n else x[np.sort(rng.choice(n, size=sample, replace=False))]
    index.train(train)
    index.nprobe = min(DEFAULT_NPROBE, nlist)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    add(index, x, ids)
    return index


def add(index, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if ids is None:
        ids = np.arange(index.ntotal, index.ntotal + len(x), dtype=np.int64)
    if len(x):
        index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))


def search_index(index, queries: np.ndarray, k: int, nprobe: int | None = None,
                 params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, k), best first; ids are -1 where fewer than k vectors were visited."""
    faiss = _faiss()
    if nprobe is not None:
        index.nprobe = max(1, min(int(nprobe), index.nlist))
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if len(q) > 1:
        return index.search(q, int(k), params=params)
    # One query scans a few cells: OpenMP threads cost more than they save (and queue behind other
    # processes on a busy machine), so single queries run on the calling thread.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(q, int(k), params=params)
    finally:
        faiss.omp_set_num_threads(threads)


# --- the filter columns kept beside the index --------------------------------------------------------


class _Columns:
    """Keys and filter columns of the indexed rows (``.columns.npz``; plain arrays, no pickle)."""

    def __init__(self, keys: np.ndarray, eye: np.ndarray, date: np.ndarray, patient: np.ndarray,
                 vocab: np.ndarray):
        self.keys, self.eye, self.date, self.patient, self.vocab = keys, eye, date, patient, vocab

    @classmethod
    def empty(cls) -> _Columns:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int32), np.zeros(0, np.int32),
                   np.zeros(0, dtype="<U1"))

    @classmethod
    def load(cls, path: Path) -> _Columns:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["keys"], data["eye"], data["date"], data["patient"], data["vocab"])

    def save(self, path: Path) -> None:
        from retinacli.fsutil import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, keys=self.keys, eye=self.eye, date=self.date, patient=self.patient, vocab=self.vocab)

    def patients(self) -> np.ndarray:
        return self.vocab[self.patient] if len(self.vocab) else np.zeros(len(self.keys), dtype="<U1")

    def keep(self, mask: np.ndarray) -> _Columns:
        names = self.patients()[mask]
        return _Columns.join(self.keys[mask], self.eye[mask], self.date[mask], names)

    @staticmethod
    def join(keys: np.ndarray, eye: np.ndarray, date: np.ndarray, names: np.ndarray) -> _Columns:
        vocab, codes = np.unique(np.asarray(names, dtype=str), return_inverse=True) if len(names) else \
            (np.zeros(0, dtype="<U1"), np.zeros(0, np.int64))
        return _Columns(np.asarray(keys, np.int64), np.asarray(eye, np.int8), np.asarray(date, np.int32),
                        codes.astype(np.int32).reshape(-1), vocab)

    def extend(self, batches: list[IndexedRows]) -> _Columns:
        if not batches:
            return self
        keys = np.concatenate([self.keys, *[b.keys for b in batches]])
        eye = np.concatenate([self.eye, *[np.array([_EYES.get(e, 0) for e in b.laterality], np.int8)
                                          for b in batches]])
        date = np.concatenate([self.date, *[np.asarray(b.date, np.int32) for b in batches]])
        names = np.concatenate([self.patients(), *[np.asarray(b.patient, dtype=str) for b in batches]])
        return _Columns.join(keys, eye, date, names)

    def mask(self, where: Filter) -> np.ndarray:
        """Filter.mask's meaning over these columns (vectorised)."""
        keep = np.ones(len(self.keys), dtype=bool)
        if where.laterality is not None:
            keep &= self.eye == _EYES.get(where.laterality.upper(), -1)
        if where.patient is not None:
            code = np.flatnonzero(self.vocab == where.patient)
            keep &= (self.patient == code[0]) if len(code) else False
        if where.date_from is not None:
            keep &= self.date >= where.date_from
        if where.date_to is not None:
            keep &= (self.date <= where.date_to) & (self.date > 0)
        return keep


# --- the backend --------------------------------------------------------------------------------


def calibrate_nprobe(index: Any, vectors: np.ndarray, keys: np.ndarray, seed: int = 0) -> tuple[int, float]:
    """(the fewest cells to scan, from DEFAULT_NPROBE up, for recall@10 >= TARGET_RECALL against exact
    search, that recall), measured with CALIBRATION_QUERIES of the indexed vectors as queries (their own
    row left out of both lists). All cells when no smaller count reaches it."""
    from retinacli.vector_index.evaluate import exact_top_k

    n = len(vectors)
    if index.nlist <= DEFAULT_NPROBE or n <= 11:
        return int(index.nlist), 1.0  # every cell: exact
    pick = np.random.default_rng(seed).choice(n, size=min(CALIBRATION_QUERIES, n), replace=False)
    queries = np.ascontiguousarray(vectors[pick])
    _, rows = exact_top_k(vectors, queries, 11)
    truth = [set(keys[r].tolist()) - {int(keys[p])} for r, p in zip(rows, pick, strict=True)]
    nprobe, recall = DEFAULT_NPROBE, 0.0
    while True:
        _, found = search_index(index, queries, 11, nprobe=nprobe)
        recall = float(np.mean([len(set(f.tolist()) & t) / max(1, len(t)) for f, t in zip(found, truth,
                                                                                      strict=True)]))
        if recall >= TARGET_RECALL or nprobe >= index.nlist:
            return min(nprobe, int(index.nlist)), recall
        nprobe = min(int(index.nlist), nprobe * 5 // 4)


class FaissSearcher:
    """A faiss index opened for queries (Searcher, base.py)."""

    def __init__(self, index: Any, columns: _Columns, nprobe: int):
        self.index, self.columns, self.nprobe = index, columns, nprobe
        self._selected: tuple[Any, np.ndarray, Any] | None = None  # one run's queries share a filter

    def _matching(self, where: Filter) -> tuple[np.ndarray, Any]:
        """(keys matching ``where``, their vectors or id selector), kept for the next query."""
        if self._selected is None or self._selected[0] != (where, EXACT_FILTER_MAX):
            matching = np.ascontiguousarray(self.columns.keys[self.columns.mask(where)], dtype=np.int64)
            if len(matching) <= EXACT_FILTER_MAX:
                helper = self.index.reconstruct_batch(matching) if len(matching) else None
            else:
                helper = (_faiss().IDSelectorBatch(matching), np.sort(matching))
            self._selected = ((where, EXACT_FILTER_MAX), matching, helper)
        return self._selected[1], self._selected[2]

    def search(self, queries: np.ndarray, k: int,
               where: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, int(k))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        keys = np.full((len(q), k), -1, dtype=np.int64)
        if self.index is None or self.index.ntotal == 0:
            return scores, keys
        if where is None or where.is_empty():
            found_s, found_k = search_index(self.index, q, k, nprobe=self.nprobe)
        else:
            matching, helper = self._matching(where)
            if not len(matching):
                return scores, keys
            if len(matching) <= EXACT_FILTER_MAX:
                found_s, found_k = self._exact(q, k, matching, helper)
            else:
                found_s, found_k = self._filtered(q, k, matching, helper)
        found_s = np.where(found_k >= 0, found_s, -np.inf).astype(np.float32)
        width = min(k, found_k.shape[1])
        scores[:, :width], keys[:, :width] = found_s[:, :width], found_k[:, :width]
        return scores, keys

    def _exact(self, q: np.ndarray, k: int, matching: np.ndarray,
               vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        # faiss's own scan, on the calling thread for one query: numpy's BLAS threads queue behind
        # faiss's OpenMP threads on a busy machine (15 ms instead of 0.4 ms for 15k x 128).
        threads = faiss.omp_get_max_threads()
        if len(q) == 1:
            faiss.omp_set_num_threads(1)
        try:
            scores, rows = faiss.knn(q, vectors, min(k, len(matching)), metric=faiss.METRIC_INNER_PRODUCT)
        finally:
            faiss.omp_set_num_threads(threads)
        return scores, matching[rows]

    def _filtered(self, q: np.ndarray, k: int, matching: np.ndarray,
                  helper: tuple[Any, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The top k among matching rows in the cells scanned. First without the selector (checking
        every visited row against it costs more than the scan): the unfiltered top k/share*2 of those
        cells, filtered, is exactly that when it still holds k matching rows; the queries where it does
        not are searched again with the id selector."""
        faiss = _faiss()
        selector, ordered = helper
        # fewer matching rows per cell: scan more cells so the top k among them are still reached
        share = len(matching) / max(1, self.index.ntotal)
        nprobe = min(self.index.nlist, math.ceil(self.nprobe * share ** -FILTER_PROBE_EXPONENT))
        wide = min(self.index.ntotal, math.ceil(2 * k / share) + 10)
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_k = np.full((len(q), k), -1, dtype=np.int64)
        if wide > WIDE_MAX:  # few rows match: the selector costs less than so long a list
            again = list(range(len(q)))
        else:
            found_s, found_k = search_index(self.index, q, wide,
                                            params=faiss.SearchParametersIVF(nprobe=nprobe))
            at = np.minimum(np.searchsorted(ordered, found_k), len(ordered) - 1)
            hit = (ordered[at] == found_k) & (found_k >= 0)
            again = []
            for i in range(len(q)):
                rows = np.flatnonzero(hit[i])[:k]
                if len(rows) < k:
                    again.append(i)
                else:
                    out_s[i], out_k[i] = found_s[i, rows], found_k[i, rows]
        if again:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            out_s[again], out_k[again] = search_index(self.index, q[again], k, params=params)
        return out_s, out_k


class FaissBackend:
    """The faiss backend: one IVF-Flat index file per modality in a local folder (no server)."""

    name = "faiss"
    extra = "faiss"
    module = "faiss"

    def update(self, folder: Path, name: str, previous: IndexInfo | None, *, dim: int,
               remove_shards: list[int], add: Callable[[], Iterator[IndexedRows]], url: str | None,
               log: Callable[[str], None] | None) -> dict[str, Any]:
        faiss = _faiss()
        if url:
            raise RetinaError("the faiss index is a local file: --url is for the qdrant backend")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index, columns, trained_on = None, _Columns.empty(), 0
        generation, nprobe, calibrated = 1, DEFAULT_NPROBE, None
        if previous is not None:
            index, columns = _load(folder, previous.params)
            trained_on = int(previous.params.get("trained_on") or 0)
            nprobe = int(previous.params.get("nprobe") or DEFAULT_NPROBE)
            calibrated = previous.params.get("calibrated_recall")
            generation = int(previous.params.get("generation") or 0) + 1
            gone = np.isin(columns.keys >> ROW_BITS, np.asarray(list(remove_shards), dtype=np.int64))
            if gone.any():
                if index is not None:
                    index.remove_ids(faiss.IDSelectorArray(np.ascontiguousarray(columns.keys[gone])))
                columns = columns.keep(~gone)
        batches = [b for b in add() if len(b.keys)]
        new_vectors = np.concatenate([b.vectors for b in batches]) if batches else \
            np.zeros((0, dim), np.float32)
        total = len(columns.keys) + len(new_vectors)
        grown = index is not None and total > RETRAIN_GROWTH * max(trained_on, 1) \
            and nlist_for(total) > index.nlist
        if total and (index is None or grown):
            old = index.reconstruct_batch(np.ascontiguousarray(columns.keys)) if index is not None and \
                len(columns.keys) else np.zeros((0, dim), np.float32)
            columns = columns.extend(batches)
            if log and grown:
                log(f"faiss: training the cells again ({total} vectors, {nlist_for(total)} cells)")
            everything = np.concatenate([old, new_vectors])
            index = build_ivf(everything, columns.keys)
            trained_on = total
            nprobe, calibrated = calibrate_nprobe(index, everything, columns.keys)
            if log:
                log(f"faiss: {index.nlist} cells, {nprobe} scanned per query (recall@10 {calibrated:.2f} "
                    "against exact search on its own vectors)")
        elif total:
            add_keys = np.concatenate([b.keys for b in batches]) if batches else np.zeros(0, np.int64)
            _add_checked(index, new_vectors, add_keys)
            columns = columns.extend(batches)
        else:
            index = None  # nothing left: an empty index (queries find nothing)
        stem = f"{name}.{generation}"
        index_file = f"{stem}.faiss" if index is not None else None
        if index is not None:
            from retinacli.fsutil import atomic_path

            with atomic_path(folder / index_file) as tmp:
                faiss.write_index(index, str(tmp))
        columns.save(folder / f"{stem}.columns.npz")
        _remove_old_generations(folder, name, keep={generation, generation - 1})
        return {"name": name, "file": index_file, "columns": f"{stem}.columns.npz", "generation": generation,
                "index_type": "IVFFlat", "metric": "inner_product", "nlist": int(index.nlist) if index else 0,
                "nprobe": nprobe, "calibrated_recall": calibrated, "trained_on": trained_on,
                "exact_filter_max": EXACT_FILTER_MAX}

    def committed(self, folder: Path, info: IndexInfo) -> None:
        """After the registry wrote ``info`` (the commit point): the previous generation's files go, so
        the folder holds one index, not two (a query that opened them already has them in memory)."""
        generation = int(info.params.get("generation") or 0)
        _remove_old_generations(Path(folder), str(info.params.get("name")), keep={generation})

    def open(self, folder: Path, info: IndexInfo) -> FaissSearcher:
        index, columns = _load(Path(folder), info.params)
        return FaissSearcher(index, columns, int(info.params.get("nprobe") or DEFAULT_NPROBE))


def _add_checked(index: Any, vectors: np.ndarray, keys: np.ndarray) -> None:
    if vectors.shape[1] != index.d:
        raise RetinaError(f"the faiss index holds {index.d}-dimensional vectors, not {vectors.shape[1]}")
    add(index, vectors, keys)


def _load(folder: Path, params: dict[str, Any]) -> tuple[Any, _Columns]:
    """(index or None when empty, columns) named by an IndexInfo's params; a RetinaError when missing."""
    faiss = _faiss()
    file, cols = params.get("file"), params.get("columns")
    try:
        if not cols:
            raise OSError("no columns file named")
        columns = _Columns.load(folder / cols)
        index = faiss.read_index(str(folder / file)) if file else None
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RetinaError(f"{folder}: the faiss index {file or cols} is missing or unreadable ({reason}); "
                          "'retina store index --backend faiss' rebuilds it") from None
    if index is not None and index.ntotal != len(columns.keys):
        raise RetinaError(f"{folder}: the faiss index {file} holds {index.ntotal} vectors, its columns "
                          f"{len(columns.keys)}; 'retina store index --backend faiss' rebuilds it")
    return index, columns


def _remove_old_generations(folder: Path, name: str, keep: set[int]) -> None:
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.(faiss|columns\.npz)$")
    for path in folder.iterdir():
        found = pattern.match(path.name)
        if found and int(found.group(1)) not in keep:
            path.unlink(missing_ok=True)
