"""LanceDB index backend (optional extra ``retina[lancedb]``, Apache-2.0): an embedded table on a local
path, the default backend for large stores.

One table per store and modality in ``STORE/ann/lancedb/`` (``<name>.lance``) with columns key (int64),
vector (fixed-size list of float32), laterality, patient and date (int32 YYYYMMDD). Below
MIN_INDEX_ROWS rows the table has no vector index: LanceDB's brute-force scan is exact and, at that
size, about as fast (tens of ms). From MIN_INDEX_ROWS on it carries an IVF_FLAT index (dot product on
the normalised vectors = cosine; the distances of the rows it visits are exact, so only recall is
approximate, as with faiss IVF-Flat) and scalar indexes on the filter columns. Rows added later are
searched by brute force beside the cells (exact, and few) until they exceed max(max_unindexed_rows,
UNINDEXED_SHARE of the table); then the cells are trained again. LanceDB's ``optimize()`` is never run
while a vector index exists: in lancedb 0.40 it re-partitions the index into a few cells of ~10^4 rows
(141 cells became 2 at 20k rows), which turns every query into a scan. So compaction and the cleanup of
old versions happen with the vector index dropped, just before it is trained again.

Filters are pre-filters (LanceDB ``where(..., prefilter=True)``): the top-k among matching rows. A
query for one patient bypasses the vector index (an exact scan of that patient's rows, found through
the scalar index), and a filtered ANN query may probe past ``nprobes`` cells until it has k rows.

Each update is a sequence of LanceDB versions; the version reached is recorded in the IndexInfo
params and ``open`` pins it, so a query sees exactly the rows the IndexInfo describes. A build from
scratch and an update that removed rows clean up every earlier version at once (removed rows do not
linger in old versions, and the disk holds one copy); a retraining after appends keeps the versions of
the last hour, so a `retrieve` running meanwhile on the previous version is not cut off.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import RetinaError, first_line, require
from retinacli.vector_index.base import ROW_BITS, IndexedRows, IndexInfo
from retinacli.vector_index.filters import Filter

# Below this many rows LanceDB's brute-force scan is exact and fast enough: p50 11 ms at 20k, 19 ms at
# 50k, 94 ms at 100k x 128 (IVF_FLAT: 3-7 ms), on a loaded 2-core CPU (benchmarks/lancedb_index_types.py).
MIN_INDEX_ROWS = 50_000
# IVF_FLAT: recall@10 1.0 at 20k-100k with 20 probes, trains in < 1 s at 1e5, and the distances of the
# rows it visits are exact; it stores a second copy of the vectors. IVF_PQ (half the disk) needs
# refine_factor for exact scores, reached recall 0.965-0.979 and trained in 26 s at 1e5.
INDEX_TYPE = "IVF_FLAT"
# Cells scanned per query: at least DEFAULT_NPROBES and PROBE_SHARE of the ~sqrt(N) cells (32 of 316 at
# 1e5). `benchmarks/index_scale.py --sizes 100000 --backends lancedb`: recall@10 1.0 (0.999 with eye +
# year filter), p50 4-7 ms; with --noise 1.5 (overlapping clusters) 0.887 (0.942 filtered): such data
# needs more cells scanned. 1.0 on the test's clustered 20k set (20 of 141 cells).
DEFAULT_NPROBES = 20
PROBE_SHARE = 0.1
# Rows added since training are scanned exactly beside the cells; past this share of the table (and
# past max_unindexed_rows, ~10 ms of brute force) the cells are trained again with them.
UNINDEXED_SHARE = 0.05
MAX_UNINDEXED_ROWS = 20_000
KEEP_VERSIONS = timedelta(hours=1)  # after appends only: a reader of the previous version keeps working
METRIC = "dot"  # vectors are L2-normalised: dot = cosine, and score = 1 - distance


def _lancedb():
    require("the LanceDB index", "lancedb", "lancedb", "pyarrow")
    # LanceDB's Rust side logs warnings (e.g. "No existing dataset ... will be created") to stderr;
    # only errors are worth a user's attention. Read when lancedb is first imported.
    os.environ.setdefault("LANCEDB_LOG", "error")
    import lancedb

    return lancedb


def _schema(dim: int):
    import pyarrow as pa

    return pa.schema([
        ("key", pa.int64()),
        ("vector", pa.list_(pa.float32(), dim)),
        ("laterality", pa.string()),
        ("patient", pa.string()),
        ("date", pa.int32()),
    ])


def _arrow(rows: IndexedRows, dim: int):
    import pyarrow as pa

    vectors = np.ascontiguousarray(rows.vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise RetinaError(f"lancedb index: rows of shape {vectors.shape} for an index of dimension {dim}")
    return pa.table({
        "key": pa.array(np.asarray(rows.keys, dtype=np.int64)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        "laterality": pa.array([(v or "").upper() for v in rows.laterality], type=pa.string()),
        "patient": pa.array([v or "" for v in rows.patient], type=pa.string()),
        "date": pa.array(np.asarray(rows.date, dtype=np.int32)),
    }, schema=_schema(dim))


def _sql_text(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def where_sql(where: Filter | None) -> str | None:
    """The SQL ``where`` of a Filter (same rows as Filter.mask), None for no filter."""
    if where is None or where.is_empty():
        return None
    terms = []
    if where.laterality is not None:
        terms.append(f"laterality = {_sql_text(where.laterality)}")
    if where.patient is not None:
        terms.append(f"patient = {_sql_text(where.patient)}")
    if where.date_from is not None:
        terms.append(f"date >= {int(where.date_from)}")
    if where.date_to is not None:
        terms.append(f"date <= {int(where.date_to)} AND date > 0")  # an unknown date fails any bound
    return " AND ".join(terms)


def delete_predicates(shards: list[int], per_delete: int = 64) -> list[str]:
    """SQL predicates selecting every key of ``shards``: consecutive shards merge into one key range,
    and up to ``per_delete`` ranges share one delete (each delete is a table version)."""
    ranges: list[list[int]] = []
    for shard in sorted({int(s) for s in shards}):
        if ranges and ranges[-1][1] == shard:
            ranges[-1][1] = shard + 1
        else:
            ranges.append([shard, shard + 1])
    terms = [f"(key >= {lo << ROW_BITS} AND key < {hi << ROW_BITS})" for lo, hi in ranges]
    return [" OR ".join(terms[i:i + per_delete]) for i in range(0, len(terms), per_delete)]


class LanceSearcher:
    """A LanceDB table opened read-only at the version its IndexInfo names."""

    def __init__(self, table, params: dict[str, Any]):
        self.table = table
        self.indexed = params.get("index_type", "none") != "none"
        self.nprobes = int(params.get("nprobes") or DEFAULT_NPROBES)

    def search(self, queries: np.ndarray, k: int,
               where: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        keys = np.full((len(q), k), -1, dtype=np.int64)
        if len(q) == 0 or k <= 0:
            return scores, keys
        sql = where_sql(where)
        query = self.table.search(q if len(q) > 1 else q[0]).distance_type(METRIC).limit(k)
        query = query.select(["key", "_distance"]).with_row_id(False)
        if sql is not None:
            query = query.where(sql, prefilter=True)
        if self.indexed:
            if where is not None and where.patient is not None:
                # One patient's rows are few: scan them exactly rather than probe cells that may miss them.
                query = query.bypass_vector_index()
            else:
                query = query.nprobes(self.nprobes)
                if sql is not None:
                    query = query.maximum_nprobes(0)  # a narrow filter probes on until it has k rows
        try:
            result = query.to_arrow()
        except Exception as exc:  # a vanished file or a corrupt fragment: one line, not a Rust trace
            raise RetinaError(f"lancedb index search failed: {first_line(exc)}") from exc
        rows = result.column("query_index").to_numpy() if "query_index" in result.column_names \
            else np.zeros(result.num_rows, dtype=np.int64)
        found_keys = result.column("key").to_numpy()
        found_scores = 1.0 - result.column("_distance").to_numpy().astype(np.float64)
        for i in range(len(q)):
            mine = np.flatnonzero(rows == i)
            order = mine[np.argsort(-found_scores[mine], kind="stable")][:k]
            scores[i, : len(order)] = found_scores[order]
            keys[i, : len(order)] = found_keys[order]
        return scores, keys


class LanceBackend:
    """retinacli.vector_index.base.Backend for LanceDB (embedded, a local path)."""

    name = "lancedb"
    extra = "lancedb"
    module = "lancedb"

    def __init__(self) -> None:
        # Instance attributes so a test can exercise the vector index on a small table.
        self.min_index_rows = MIN_INDEX_ROWS
        self.max_unindexed_rows = MAX_UNINDEXED_ROWS
        self.nprobes = DEFAULT_NPROBES

    def update(self, folder: Path, name: str, previous: IndexInfo | None, *, dim: int,
               remove_shards: list[int], add: Callable[[], Iterator[IndexedRows]], url: str | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Bring table ``name`` in ``folder`` up to date (see Backend.update); ``url`` must be None."""
        lancedb = _lancedb()
        if url:
            raise RetinaError("the lancedb index is embedded (a local path); --url is for --backend qdrant")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        db = lancedb.connect(str(folder))
        if previous is None:
            self._drop(folder, name)  # from scratch: whatever the folder held under this name goes
            table = db.create_table(name, schema=_schema(dim))
            params: dict[str, Any] = {}
            remove_shards = []
        else:
            params = dict(previous.params)
            try:
                table = db.open_table(name)
            except Exception as exc:
                # the registry rebuilds from scratch (previous=None) on this error
                raise RetinaError(f"the lancedb index {folder / (name + '.lance')} cannot be updated "
                                  f"({first_line(exc)})") from exc
            if table.schema.field("vector").type.list_size != dim:
                raise RetinaError(f"the lancedb index {folder / (name + '.lance')} holds vectors of another "
                                  "dimension")
        removed = False  # rows really deleted (the registry also names shards that may be absent)
        for predicate in delete_predicates(remove_shards):
            if table.count_rows(predicate):
                table.delete(predicate)
                removed = True
        for rows in add():
            if len(rows.keys):
                table.add(_arrow(rows, dim))
        total = int(table.count_rows())
        params.update(table=name, metric=METRIC, refine_factor=None)
        params.setdefault("nprobes", self.nprobes)
        params.setdefault("index_type", "none")
        vector_index = self._vector_index_name(table)
        unindexed = self._unindexed(table, vector_index, total)
        clean = timedelta(0) if previous is None or removed else KEEP_VERSIONS
        if total < self.min_index_rows:
            for index in list(table.list_indices()):  # too small for cells: brute force is exact
                table.drop_index(index.name)
            params.update(index_type="none", num_partitions=None, trained_rows=0)
            self._optimize(table, clean)
        elif vector_index is None or removed or unindexed > max(self.max_unindexed_rows,
                                                                UNINDEXED_SHARE * total):
            if vector_index is not None:
                table.drop_index(vector_index)  # see the module docstring: optimize() with it present
            self._optimize(table, clean)
            self._train(table, total, params, log)
        # else: the new rows are few; they are scanned exactly beside the cells
        params["version"] = int(table.version)
        params["rows"] = total
        params["unindexed_rows"] = self._unindexed(table, self._vector_index_name(table), total) \
            if params["index_type"] != "none" else total
        return params

    # -- helpers ------------------------------------------------------------------------------------

    @staticmethod
    def _drop(folder: Path, name: str) -> None:
        # the table's folder, even when it is too damaged for drop_table to read
        shutil.rmtree(folder / f"{name}.lance", ignore_errors=True)

    @staticmethod
    def _vector_index_name(table) -> str | None:
        for index in table.list_indices():
            if "vector" in list(index.columns):
                return index.name
        return None

    @staticmethod
    def _unindexed(table, vector_index: str | None, total: int) -> int:
        if vector_index is None:
            return total
        stats = table.index_stats(vector_index)
        return int(stats.num_unindexed_rows) if stats is not None else total

    @staticmethod
    def _has_deletions(table) -> bool:
        """Whether the fragments hold rows deleted but not yet compacted away (the version's metadata)."""
        for version in table.list_versions():
            if int(version.get("version", -1)) == int(table.version):
                return int((version.get("metadata") or {}).get("total_deletion_file_rows") or 0) > 0
        return True  # unknown: assume so (the slower-to-sample case is the safe one)

    def _train(self, table, total: int, params: dict[str, Any], log) -> None:
        from lancedb.index import Bitmap, BTree, IvfFlat

        partitions = max(1, int(math.sqrt(total)))
        # k-means samples 256 rows a cell by random access, which crawls over a fragment with deleted
        # rows (192 s instead of 6 s at 1e5 x 128, lancedb 0.40); a sample as large as the table is read
        # by one scan instead. Deleted rows stay in the fragments until compaction finds > 10 % of them.
        sample_rate = max(256, math.ceil(total / partitions) + 1) if self._has_deletions(table) else 256
        if log:
            log(f"lancedb: training an {INDEX_TYPE} index ({partitions} cells) on {total} vectors")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table.create_index("vector", config=IvfFlat(distance_type=METRIC, num_partitions=partitions,
                                                        sample_rate=sample_rate), replace=True)
            # the filter columns: a patient is found without a scan; 3 eye values suit a bitmap
            table.create_index("laterality", config=Bitmap(), replace=True)
            table.create_index("patient", config=BTree(), replace=True)
            table.create_index("date", config=BTree(), replace=True)
        nprobes = max(self.nprobes, math.ceil(PROBE_SHARE * partitions))
        params.update(index_type=INDEX_TYPE, num_partitions=partitions, trained_rows=int(total),
                      nprobes=nprobes, sample_rate=sample_rate)

    @staticmethod
    def _optimize(table, cleanup_older_than: timedelta) -> None:
        # Compacts small fragments (one per added shard) and removes versions older than the given age;
        # never called while a vector index exists (module docstring). The caller holds the writer lock.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table.optimize(cleanup_older_than=cleanup_older_than,
                           delete_unverified=cleanup_older_than == timedelta(0))

    def open(self, folder: Path, info: IndexInfo) -> LanceSearcher:
        """Open the table at the version ``info`` names, read only."""
        lancedb = _lancedb()
        name = info.params.get("table")
        path = Path(folder) / f"{name}.lance"
        if not name or not path.is_dir():
            raise RetinaError(f"the lancedb {info.modality} index is missing ({path}); "
                              "'retina store index' builds it")
        try:
            db = lancedb.connect(str(folder))
            version = info.params.get("version")
            table = db.open_table(name, version=int(version)) if version is not None else db.open_table(name)
        except Exception as exc:
            raise RetinaError(f"the lancedb {info.modality} index in {folder} cannot be opened "
                              f"({first_line(exc)}); 'retina store index' rebuilds it") from exc
        return LanceSearcher(table, info.params)

