"""The embedding store: append-only shards of float32 vectors plus a metadata table (docs/store.md).

Layout (clip-retrieval's, plus an index and a lock)::

    STORE/store.json                   the index: model, embedding dim, spec hash, committed shards
    STORE/embeddings/emb_NNNNN.npy     float32 (rows, dim), L2-normalised
    STORE/metadata/meta_NNNNN.parquet  one row per vector, row i <-> vector i
    STORE/errors.csv                   inputs the last `retina embed` run could not embed (path, reason)
    STORE/secret.key                   per-store key for the pseudonymous ids (never leaves the store)
    STORE/.lock                        held (flock) by the one process writing the store
    STORE/ann/                         optional search indexes (derived), written only by writers
                                       (retinacli.vector_index: lancedb / faiss / qdrant)

A shard is committed when its vectors, then its metadata, were written (temp file, fsync, rename) and
the index lists it; files the index does not list are debris of a killed run and are removed by the
next writer. So a killed run never leaves the store unreadable, and readers need no lock.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import EXIT_USAGE, RetinaError, StoreBusyError, StoreDamagedError
from retinacli.fsutil import atomic_write_bytes
from retinacli.privacy import SECRET_FILE, SecretKeyMissingError, create_secret, load_secret
from retinacli.redaction import Root, roots_for

STORE_FORMAT = "retina-embedding-store"
# store.json layout version (docs/store.md): 2 added the `package` record; 3 the `roots` list and the
# rows' `root` column (paths relative to a root; older rows keep their absolute paths). A reader opens
# every version up to its own and refuses newer ones; a writer upgrades an older store's index when it
# next writes. 4 added the `ood_score` and `ood` columns (older rows read them as null).
STORE_FORMAT_VERSION = 4
INDEX_FILE = "store.json"
ERRORS_FILE = "errors.csv"
LOCK_FILE = ".lock"
DEFAULT_STORE = Path(".retina") / "store"
STORE_ENV = "RETINA_STORE"

# Metadata columns, in order. Identifiers are pseudonyms (keyed hashes with the store's secret);
# `patient_identifier` stays empty unless the user asked for --keep-identifiers.
METADATA_COLUMNS: dict[str, str] = {
    "id": "pseudonymous item id: keyed hash of the file's identity (SOPInstanceUID, else path+size+mtime)",
    "source_key": "keyed hash of the source's path+size+mtime: what `retina embed` skips on a re-run",
    "modality": "oct or fundus",
    "root": "id of the root (a PATH given to `retina embed`, listed in store.json `roots`) the path is under",
    "path": "the item's file or folder relative to its root's parent folder, components naming the patient "
            "replaced by its pseudonym (format 1 and 2 rows: the absolute path, no root)",
    "format": "reader format (dicom, png, npy, vol, ...)",
    "laterality": "OD (right) or OS (left), when known",
    "date": "study / acquisition date YYYY-MM-DD, when known (rows written by retina 0.1.0: YYYYMMDD)",
    "acquisition_datetime": "YYYY-MM-DDTHH:MM:SS, when known (0.1.0: YYYYMMDDHHMMSS)",
    "device": "canonical vendor / model from a fixed table (never header text), when recognised",
    "patient": "pseudonymous patient id (keyed hash), when the file names a patient",
    "study": "pseudonymous study id (keyed hash of StudyInstanceUID), when known",
    "references": "ids of referenced items (an OCT's localizer fundus), space-separated",
    "patient_identifier": "the raw patient id; only with --keep-identifiers",
    "model_id": "the model that made the vector (name@version+hash)",
    "engine": "how the vector was computed: backend/precision, e.g. onnxruntime/fp32 or openvino/int8",
    "ood_score": "cosine similarity to the nearest training centroid of the package (float; null when the "
                 "package has no out-of-distribution reference, and in rows of format 1-3)",
    "ood": "true when ood_score is below the package's threshold or a statistic of the model input lies "
           "outside its training range: the item does not look like the training data (boolean; null as "
           "ood_score)",
    "embedded_at": "UTC time the shard was committed",
}


class StoreError(RetinaError):
    """The store is missing, unreadable, or does not fit the request."""


class StoreKeyMissingError(StoreError):
    """A store with rows but no secret.key: appending would re-key it and duplicate every source."""


class StoreModelMismatchError(StoreError):
    """Vectors from one model must never be mixed with (or compared against) another model's."""

    exit_code = EXIT_USAGE


def default_store_path() -> Path:
    """`$RETINA_STORE` when set, else ./.retina/store in the current directory."""
    env = os.environ.get(STORE_ENV)
    return Path(env).expanduser() if env else DEFAULT_STORE


def store_path_and_origin(path: Path | str | None, option: str = "--store") -> tuple[Path, str]:
    """The store to use and why (for echoing defaults): the option, $RETINA_STORE, or the default."""
    if path is not None:
        return Path(path).expanduser(), option
    if os.environ.get(STORE_ENV):
        return default_store_path(), f"${STORE_ENV}"
    return DEFAULT_STORE, "default ./.retina/store"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"ood_score": pa.float64(), "ood": pa.bool_()}  # every other column is text
    schema = pa.schema([(name, types.get(name, pa.string())) for name in METADATA_COLUMNS])
    columns = {name: [row.get(name) if name in types else _as_text(row.get(name)) for row in rows]
               for name in METADATA_COLUMNS}
    table = pa.Table.from_pydict(columns, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _as_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return printable(str(value))


def printable(text: str) -> str:
    """Valid UTF-8 text: a file name's undecodable bytes (surrogate escapes) become \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    index: int
    rows: int
    embeddings: Path
    metadata: Path


class EmbeddingStore:
    """Read access to a store. Only committed shards are visible; readers take no lock."""

    def __init__(self, root: Path, index: dict[str, Any]):
        self.root = Path(root)
        self.index = index

    @classmethod
    def open(cls, root: Path | str, check: bool = True) -> EmbeddingStore:
        """Open a store for reading; a damaged one (store.json's fields, shard headers, sizes and row
        counts: retinacli.storecheck's cheap checks) is refused with StoreDamagedError (exit 5).
        `check=False` skips those checks (`retina store verify` / `repair` do their own)."""
        from retinacli.storecheck import damaged_message, quick_problems

        root = Path(root)
        index_path = root / INDEX_FILE
        if not index_path.is_file():
            refuse_orphan_shards(root)
            # A --store naming no store is a usage error (2), like any missing path argument.
            raise StoreError(
                f"{root}: no embedding store here (no {INDEX_FILE}); "
                f"create one with 'retina embed PATH --store {root}'",
                exit_code=EXIT_USAGE,
            )
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as exc:
            problem = f"store.json is not valid JSON ({' '.join(str(exc).split())})"
            raise StoreDamagedError(damaged_message(root, problem)) from None
        if not isinstance(index, dict):
            raise StoreDamagedError(damaged_message(root, "store.json is not a JSON object"))
        if index.get("format") != STORE_FORMAT:
            raise StoreError(f"{index_path}: not a retina embedding store (format is not {STORE_FORMAT!r})")
        version = index.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            problem = f"store.json: format_version {version!r} is not a store format version"
            raise StoreDamagedError(damaged_message(root, problem))
        if version > STORE_FORMAT_VERSION:
            raise StoreError(
                f"{index_path}: store format version {version} is newer than this retina reads "
                f"(up to {STORE_FORMAT_VERSION}); upgrade retina"
            )
        if check:
            problems = quick_problems(root, index)
            if problems:
                raise StoreDamagedError(damaged_message(root, problems[0]))
        return cls(root, index)

    @property
    def format_version(self) -> int:
        return int(self.index["format_version"])

    @property
    def package_record(self) -> dict[str, Any] | None:
        """The package the store was built with (model_id, name, version, path), or None: stores of
        format version 1, or written by a caller that did not name its package."""
        record = self.index.get("package")
        return record if isinstance(record, dict) else None

    @property
    def roots(self) -> list[Root]:
        """The PATHs given to `retina embed` (format 3); rows name theirs in the `root` column."""
        return [Root(str(r["id"]), str(r["path"]), r.get("path_key")) for r in self.index.get("roots") or []
                if isinstance(r, dict) and r.get("id") and r.get("path")]

    @property
    def model_id(self) -> str:
        return self.index["model_id"]

    @property
    def model_name(self) -> str | None:
        return self.index.get("model_name")

    @property
    def embed_dim(self) -> int:
        return int(self.index["embed_dim"])

    @property
    def spec_hash(self) -> str | None:
        return self.index.get("spec_hash")

    @property
    def shards(self) -> list[Shard]:
        return [
            Shard(int(s["index"]), int(s["rows"]), self.root / s["embeddings"], self.root / s["metadata"])
            for s in self.index.get("shards", [])
        ]

    def __len__(self) -> int:
        return sum(s.rows for s in self.shards)

    def shard_vectors(self, shard: Shard) -> np.ndarray:
        """The shard's vectors, memory-mapped (read-only)."""
        try:
            vectors = np.load(shard.embeddings, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # changed since `open` checked it
            raise self._damaged(shard, f"{shard.embeddings.name} unreadable ({exc})") from None
        if vectors.shape != (shard.rows, self.embed_dim) or vectors.dtype != np.float32:
            raise self._damaged(shard, f"{shard.embeddings.name}: expected float32 "
                                f"{(shard.rows, self.embed_dim)}, found {vectors.dtype} {vectors.shape}")
        return vectors

    def _damaged(self, shard: Shard, problem: str) -> StoreDamagedError:
        from retinacli.storecheck import damaged_message

        problem = f"shard {shard.index}: {' '.join(problem.split())}"
        return StoreDamagedError(damaged_message(self.root, problem))

    def shard_metadata(self, shard: Shard, columns: list[str] | None = None) -> dict[str, list[Any]]:
        import pyarrow.parquet as pq

        missing: list[str] = []
        try:
            if columns is not None:  # a column added by a later format (e.g. `root`) reads as empty
                present = set(pq.read_schema(shard.metadata).names)
                missing = [c for c in columns if c not in present]
                columns = [c for c in columns if c in present]
            table = pq.read_table(shard.metadata, columns=columns)
        except Exception as exc:  # pyarrow raises many types for a damaged file
            raise self._damaged(shard, f"{shard.metadata.name} unreadable ({exc})") from None
        if table.num_rows != shard.rows:
            raise self._damaged(shard, f"{shard.metadata.name}: {table.num_rows} rows, "
                                f"store.json says {shard.rows}")
        data = table.to_pydict()
        if columns is None:  # every column: rows written before format 4 have null ood fields
            missing = [c for c in ("ood_score", "ood") if c not in data]
        data.update({c: [None] * shard.rows for c in missing})
        return data

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[tuple[Shard, np.ndarray, dict]]:
        for shard in self.shards:
            yield shard, self.shard_vectors(shard), self.shard_metadata(shard, columns)

    def metadata(self, columns: list[str] | None = None) -> list[dict[str, Any]]:
        """Every committed row as a dict, in store order."""
        rows: list[dict[str, Any]] = []
        for shard in self.shards:
            table = self.shard_metadata(shard, columns)
            names = list(table)
            ordered = [table[n] for n in names]
            rows.extend(dict(zip(names, values, strict=True)) for values in zip(*ordered, strict=True))
        return rows

    def vectors(self) -> np.ndarray:
        """All vectors in store order (a copy in memory; use iter_shards for big stores)."""
        parts = [np.asarray(self.shard_vectors(s)) for s in self.shards]
        if not parts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.concatenate(parts, axis=0)

    def column_values(self, column: str) -> set[str]:
        values: set[str] = set()
        for shard in self.shards:
            values.update(v for v in self.shard_metadata(shard, [column])[column] if v is not None)
        return values

    def paths_without_root(self) -> list[str]:
        """The stored (absolute) paths of rows written before format 3, which name no root."""
        found: list[str] = []
        for shard in self.shards:
            meta = self.shard_metadata(shard, ["root", "path"])
            found.extend(p for r, p in zip(meta["root"], meta["path"], strict=True) if r is None and p)
        return found

    def find(self, item_id: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The vector and metadata row of one item id, or None."""
        for shard in self.shards:
            ids = self.shard_metadata(shard, ["id"])["id"]
            if item_id in ids:
                row = ids.index(item_id)
                meta = self.shard_metadata(shard)
                return np.array(self.shard_vectors(shard)[row]), {k: v[row] for k, v in meta.items()}
        return None

    def require_model(self, model_id: str, *also: str) -> None:
        """Refuse a model other than the store's; `also`: the package's other ids (its id under the
        older rule, which a store made before the current rule records)."""
        if self.model_id != model_id and self.model_id not in also:
            raise StoreModelMismatchError(
                f"{self.root}: the store holds embeddings of model {self.model_id}, not {model_id}; "
                "embeddings of different models cannot be mixed or compared (use the store's model or "
                "another store)"
            )


# --- writing --------------------------------------------------------------------------------------


class _Lock:
    """An exclusive advisory lock on STORE/.lock, released by the OS when the process dies."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self._fh: Any = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            if sys.platform.startswith("win"):
                import msvcrt

                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StoreBusyError(
                f"{self.path.parent}: the store is being written by {holder}; wait for it to finish "
                "or write to another store with --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"retina pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.close()  # closing drops the flock
            self._fh = None


def writer_secret(root: Path, index: dict[str, Any], create: bool = True) -> bytes | None:
    """The key a writer hashes ids with: the store's own, or a fresh one for a store without rows.

    A store that has rows but lost its key is refused: a new key would give every source new ids,
    so the next run would embed them all again as duplicates that cannot be linked to the old rows.
    `create=False` only checks: None where a fresh key would be made.
    """
    try:
        return load_secret(root)
    except SecretKeyMissingError:
        if index.get("shards") or int(index.get("rows") or 0):
            raise StoreKeyMissingError(
                f"{Path(root) / SECRET_FILE}: the store's key is missing, but the store holds "
                f"{int(index.get('rows') or 0)} rows; without it the pseudonyms of its rows cannot be "
                "recomputed and every source would be embedded again as a duplicate. Restore secret.key "
                "from a backup, or embed into a new store with --out"
            ) from None
        return create_secret(root) if create else None


_SHARD_RE = re.compile(r"^(emb|meta)_(\d{5,})\.(npy|parquet)$")


def refuse_orphan_shards(root: Path) -> None:
    """A store that lost store.json but holds shard files is damaged, not absent (a writer creates
    store.json before any shard, so no crash leaves this)."""
    from retinacli.storecheck import damaged_message

    orphans = [p for folder in ("embeddings", "metadata") if (root / folder).is_dir()
               for p in (root / folder).iterdir() if _SHARD_RE.match(p.name)]
    if orphans:
        problem = f"store.json is missing but {len(orphans)} shard files are here"
        raise StoreDamagedError(damaged_message(root, problem))


class StoreWriter(EmbeddingStore):
    """Append access for one process at a time: `with StoreWriter.open_for_model(...) as store:`.

    Rows are buffered by `add` and committed as one shard by `commit` (or when the buffer reaches
    `shard_rows`); leaving the `with` block commits what is buffered, even after an exception, so
    finished work is never lost.
    """

    def __init__(self, root: Path, index: dict[str, Any], lock: _Lock, shard_rows: int):
        super().__init__(root, index)
        self._lock = lock
        self.shard_rows = max(1, int(shard_rows))
        self._rows: list[dict[str, Any]] = []
        self._vectors: list[np.ndarray] = []
        self.secret = writer_secret(self.root, index)
        self.on_commit: Any = None  # optional callback(shard_index), e.g. for progress or tests
        self.upgraded_from: int | None = None  # the format version this writer upgraded the index from

    @classmethod
    def open_for_model(
        cls,
        root: Path | str,
        *,
        model_id: str,
        embed_dim: int,
        spec_hash: str | None = None,
        model_name: str | None = None,
        model_version: str | None = None,
        shard_rows: int = 4096,
        package: Path | str | None = None,
    ) -> StoreWriter:
        """Create the store, or open an existing one built with the same model, and take its lock.

        `package`: the folder of the package making the vectors, recorded in store.json so later
        commands find it from any folder. An existing store's record is kept while it still holds
        the model; an older store's index is upgraded to this format version (`upgraded_from`).
        """
        root = Path(root)
        if (root / INDEX_FILE).is_file():
            # Checked before the lock too, so a refused store is left exactly as it was (not even .lock).
            writer_secret(root, EmbeddingStore.open(root).index, create=False)
        else:
            refuse_orphan_shards(root)  # a new index would make their vectors debris, deleted
        root.mkdir(parents=True, exist_ok=True)
        lock = _Lock(root)
        lock.acquire()
        try:
            if (root / INDEX_FILE).exists():
                index = EmbeddingStore.open(root).index
                if index["model_id"] != model_id:
                    raise StoreModelMismatchError(
                        f"{root}: the store holds embeddings of model {index['model_id']}; refusing to add "
                        f"vectors from {model_id} (embed into another store with --out, or use that model)"
                    )
                if int(index["embed_dim"]) != int(embed_dim):
                    raise StoreModelMismatchError(
                        f"{root}: the store's vectors have {index['embed_dim']} dimensions, not {embed_dim}"
                    )
                writer_secret(root, index)  # refuse a missing or bad key before anything is written
                upgraded_from, updated = _upgraded_index(index, package, model_id, model_name, model_version)
                if updated is not None:
                    atomic_write_bytes(root / INDEX_FILE, _index_bytes(updated))
                    index = updated
            else:
                upgraded_from = None
                index = {
                    "format": STORE_FORMAT,
                    "format_version": STORE_FORMAT_VERSION,
                    "model_id": model_id,
                    "model_name": model_name,
                    "model_version": model_version,
                    "embed_dim": int(embed_dim),
                    "spec_hash": spec_hash,
                    "package": _package_record(package, model_id, model_name, model_version),
                    "roots": [],
                    "created": _now(),
                    "updated": _now(),
                    "rows": 0,
                    "shards": [],
                    "columns": METADATA_COLUMNS,
                }
                (root / "embeddings").mkdir(exist_ok=True)
                (root / "metadata").mkdir(exist_ok=True)
                atomic_write_bytes(root / INDEX_FILE, _index_bytes(index))
            writer = cls(root, index, lock, shard_rows)
            writer.upgraded_from = upgraded_from
            writer._remove_debris()
            return writer
        except BaseException:
            lock.release()
            raise

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._lock.release()

    def _remove_debris(self) -> None:
        """Delete shard files the index does not list (a killed run's) and stray temp files."""
        listed = {Path(s["embeddings"]).name for s in self.index["shards"]}
        listed |= {Path(s["metadata"]).name for s in self.index["shards"]}
        for folder in (self.root / "embeddings", self.root / "metadata"):
            folder.mkdir(exist_ok=True)
            for path in folder.iterdir():
                if path.name.endswith(".tmp") or (_SHARD_RE.match(path.name) and path.name not in listed):
                    path.unlink(missing_ok=True)
        for path in self.root.glob(".*.tmp"):
            path.unlink(missing_ok=True)

    @property
    def pending_rows(self) -> int:
        return len(self._rows)

    def add(self, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
        """Buffer rows (metadata dicts) with their vectors; commits a shard when the buffer is full.

        Call it with whole sources (all the items one file yields), so a committed source is complete.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.embed_dim or len(rows) != len(vectors):
            raise ValueError(f"expected {len(rows)} vectors of dim {self.embed_dim}, got {vectors.shape}")
        self._rows.extend(rows)
        self._vectors.append(vectors)
        if len(self._rows) >= self.shard_rows:
            self.commit()

    def commit(self) -> int | None:
        """Write the buffered rows as the next shard; returns its index (None when nothing buffered)."""
        if not self._rows:
            return None
        rows, vectors = self._rows, np.concatenate(self._vectors, axis=0)
        shard_index = max((int(s["index"]) for s in self.index["shards"]), default=-1) + 1
        emb_rel = f"embeddings/emb_{shard_index:05d}.npy"
        meta_rel = f"metadata/meta_{shard_index:05d}.parquet"
        stamp = _now()
        for row in rows:
            row["model_id"] = self.model_id
            row["embedded_at"] = stamp
        # Vectors first, then metadata, then the index: the index is the commit point.
        atomic_write_bytes(self.root / emb_rel, _npy_bytes(vectors))
        atomic_write_bytes(self.root / meta_rel, _parquet_bytes(rows))
        index = dict(self.index)
        shard = {"index": shard_index, "rows": len(rows), "embeddings": emb_rel, "metadata": meta_rel}
        index["shards"] = [*self.index["shards"], shard]
        index["rows"] = int(index.get("rows", 0)) + len(rows)
        index["updated"] = stamp
        atomic_write_bytes(self.root / INDEX_FILE, _index_bytes(index))
        self.index = index
        self._rows, self._vectors = [], []
        if self.on_commit is not None:
            self.on_commit(shard_index)
        return shard_index

    def add_roots(self, paths: list[Path]) -> list[Root]:
        """Record the PATHs of this run as roots (known ones keep their id); returns this run's roots
        with their real paths (for locating files; store.json gets them via `record_roots`)."""
        roots, run = roots_for(paths, self.roots, self.secret)
        self._record_roots(roots)
        return run

    def record_roots(self, run: list[Root], shown: Any) -> None:
        """Rewrite this run's roots in store.json as `shown` (a PathRedactor) prints a path, now
        that the run's identifiers are known: a root named after a patient does not name them."""
        paths = {r.id: shown.redact(r.path) for r in run}
        self._record_roots([Root(r.id, paths.get(r.id, r.path), r.path_key) for r in self.roots])

    def _record_roots(self, roots: list[Root]) -> None:
        records = [r.to_record() for r in roots]
        if records != self.index.get("roots"):
            index = dict(self.index)
            index["roots"] = records
            atomic_write_bytes(self.root / INDEX_FILE, _index_bytes(index))
            self.index = index

    def write_errors(self, errors: Iterable[tuple[str, str]]) -> Path:
        """Replace errors.csv with this run's failures: one row per input (path, reason)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "reason"])
        for path, reason in errors:
            writer.writerow([printable(str(path)), printable(" ".join(str(reason).split()))])
        target = self.root / ERRORS_FILE
        atomic_write_bytes(target, buf.getvalue().encode("utf-8"))
        return target


def discard_new_store(root: Path | str, *, remove_folder: bool, keep: Iterable[str] = ()) -> None:
    """Remove a store this run created and committed nothing to (its index, key, lock, empty shard
    folders), so a retry starts clean; `remove_folder` also removes `root` when it is then empty.
    A store holding rows is never touched, nor the entries named in `keep` (there before the run)."""
    import contextlib
    import shutil

    root = Path(root)
    try:
        index = json.loads((root / INDEX_FILE).read_text())
        if int(index.get("rows", 0)) != 0 or index.get("shards"):
            return
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # no readable index: only the files a creation writes are removed below
    keep = set(keep)
    for name in {INDEX_FILE, SECRET_FILE, ERRORS_FILE, LOCK_FILE} - keep:
        (root / name).unlink(missing_ok=True)
    for name in {"embeddings", "metadata", "ann"} - keep:
        folder = root / name
        if folder.is_dir() and not any(_SHARD_RE.match(p.name) for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
    if remove_folder:
        with contextlib.suppress(OSError):  # something else is in it now: leave it
            root.rmdir()


def _package_record(
    package: Path | str | None, model_id: str, name: str | None, version: str | None
) -> dict[str, Any] | None:
    if package is None:
        return None
    return {"model_id": model_id, "name": name, "version": version,
            "path": str(Path(package).expanduser().resolve())}


def _upgraded_index(
    index: dict[str, Any], package: Path | str | None, model_id: str, name: str | None, version: str | None
) -> tuple[int | None, dict[str, Any] | None]:
    """(the version upgraded from, the new index) for an existing store, or (None, None) to keep it.

    A version-1 index becomes version 2 with a package record (null when the writer named no
    package). A recorded package folder that no longer holds the model is replaced by `package`.
    """
    old_version = int(index["format_version"])
    record = index.get("package") if isinstance(index.get("package"), dict) else None
    new_record = _package_record(package, model_id, name, version)
    stale = new_record != record and (record is None or not _holds_model(record.get("path"), model_id))
    if old_version >= STORE_FORMAT_VERSION and not (stale and new_record is not None):
        return None, None
    updated = dict(index)
    updated["format_version"] = STORE_FORMAT_VERSION
    updated["package"] = new_record if stale and new_record is not None else record
    updated.setdefault("roots", [])  # rows written before format 3 keep absolute paths and no root
    updated["columns"] = METADATA_COLUMNS  # rows of older formats read the new columns as null
    return (old_version if old_version < STORE_FORMAT_VERSION else None), updated


def _holds_model(folder: str | None, model_id: str) -> bool:
    """Whether `folder` is a package whose model_id is `model_id` (reads only its retina.json)."""
    from retinacli.package import package_model_ids

    return bool(folder) and model_id in package_model_ids(Path(folder))  # a legacy id counts too


def _index_bytes(index: dict[str, Any]) -> bytes:
    from retinacli.jsonutil import dumps

    return (dumps(index, indent=2, sort_keys=False) + "\n").encode("utf-8")


def read_errors(root: Path | str) -> list[tuple[str, str]]:
    path = Path(root) / ERRORS_FILE
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [(row["path"], row["reason"]) for row in csv.DictReader(fh)]
