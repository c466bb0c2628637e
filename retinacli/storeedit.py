"""Removing rows from an embedding store: `retina store remove --patient` and `retina store prune`.

Both take the store's lock and rewrite only the shards that lose rows: the kept rows (vectors and
metadata filtered by the same mask, so they stay aligned) go to new shard files with new numbers,
then store.json is replaced to list them instead of the old ones, then the old files are deleted.
A crash before store.json is replaced leaves the old store intact (the new files are unlisted debris
the next writer removes); after it, the old files are debris. Then every search index is updated
(retinacli.vector_index.after_rows_removed): the dropped shards' keys are deleted, the rewritten
shards' rows added, so no index keeps a removed row.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import RetinaError

Selector = Callable[[dict[str, list[Any]]], list[str | None]]  # metadata -> per-row reason, None keeps


def patient_selector(patient: str, secret: bytes | None) -> tuple[Selector, set[str]]:
    """Rows whose `patient` column is `patient` (the pseudonym), or its keyed hash when the user gave
    the raw id (only matched against the store's key; never printed)."""
    from retinacli.privacy import pseudonym

    wanted = {patient}
    if secret is not None:
        wanted.add(pseudonym(patient, secret, prefix="p"))
    return (lambda meta: ["patient" if p in wanted else None for p in meta["patient"]]), wanted


def _table_bytes(table: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def plan_removal(store: Any, select: Selector) -> list[dict[str, Any]]:
    """Per shard with rows to drop: its entry, the keep mask and the dropped rows (id, path, reason)."""
    plan = []
    for shard, entry in zip(store.shards, store.index["shards"], strict=True):
        meta = store.shard_metadata(shard, ["id", "root", "path", "patient", "source_key"])
        reasons = select(meta)
        if not any(reasons):
            continue
        dropped = [{"id": meta["id"][i], "root": meta["root"][i], "path": meta["path"][i], "reason": why}
                   for i, why in enumerate(reasons) if why]
        plan.append({"entry": entry, "shard": shard, "keep": np.array([not r for r in reasons], bool),
                     "dropped": dropped})
    return plan


def rewrite(store_root: Path, select_fn: Callable[[Any], Selector], *, dry_run: bool,
            errors_token: set[str] | None = None, log: Callable[[str], None] | None = None,
            none_message: str | None = None) -> dict[str, Any]:
    """Drop the rows `select_fn(store)` picks, under the store's lock; returns the summary.

    `errors_token`: pseudonyms whose errors.csv rows (a redacted path names the patient by it) go too.
    `none_message`: raised (exit 1, nothing changed) when no row is picked.
    """
    import pyarrow.parquet as pq

    from retinacli.fsutil import atomic_write_bytes, fsync_dir
    from retinacli.store import (
        ERRORS_FILE,
        INDEX_FILE,
        EmbeddingStore,
        StoreWriter,
        _index_bytes,
        _Lock,
        _now,
    )

    EmbeddingStore.open(store_root)  # a missing or damaged store is refused before the lock
    lock = _Lock(store_root)
    lock.acquire()
    try:
        store = EmbeddingStore.open(store_root)  # again under the lock: a writer may have committed
        plan = plan_removal(store, select_fn(store))
        dropped = [row for part in plan for row in part["dropped"]]
        errors_path = store_root / ERRORS_FILE
        error_rows, kept_errors = _split_errors(errors_path, errors_token or set())
        summary: dict[str, Any] = {
            "store": str(store_root), "dry_run": dry_run, "rows_removed": len(dropped),
            "rows_before": len(store), "rows_after": len(store) - len(dropped),
            "shards_rewritten": [], "shards_dropped": [], "errors_rows_removed": error_rows,
            "index": "none", "indexes": {}, "removed": dropped,
        }
        if not dropped and none_message:
            raise RetinaError(none_message)
        if dry_run or not (dropped or error_rows):
            return summary
        StoreWriter._remove_debris(store)  # a killed run's unlisted files, as every writer removes them
        number = max((int(e["index"]) for e in store.index["shards"]), default=-1) + 1
        replaced: dict[int, dict[str, Any] | None] = {}
        old_files: list[Path] = []
        for part in plan:
            shard, keep = part["shard"], part["keep"]
            old_files += [shard.embeddings, shard.metadata]
            if not keep.any():
                replaced[shard.index] = None
                summary["shards_dropped"].append(shard.index)
                continue
            vectors = np.asarray(store.shard_vectors(shard))[keep]
            table = pq.read_table(shard.metadata).filter(keep)  # its own schema: older formats stay so
            emb_rel, meta_rel = f"embeddings/emb_{number:05d}.npy", f"metadata/meta_{number:05d}.parquet"
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
            atomic_write_bytes(store_root / emb_rel, buf.getvalue())
            atomic_write_bytes(store_root / meta_rel, _table_bytes(table))
            replaced[shard.index] = {"index": number, "rows": int(keep.sum()), "embeddings": emb_rel,
                                     "metadata": meta_rel}
            summary["shards_rewritten"].append({"from": shard.index, "to": number, "rows": int(keep.sum())})
            number += 1
        if dropped:
            index = dict(store.index)
            index["shards"] = [replaced.get(int(e["index"]), e) for e in store.index["shards"]
                               if replaced.get(int(e["index"]), e) is not None]
            index["rows"] = sum(int(e["rows"]) for e in index["shards"])
            index["updated"] = _now()
            atomic_write_bytes(store_root / INDEX_FILE, _index_bytes(index))  # the commit point
            for path in old_files:
                path.unlink(missing_ok=True)
            fsync_dir(store_root)
        if error_rows:
            _write_errors(errors_path, kept_errors)
        if dropped:
            summary["indexes"] = _update_indexes(EmbeddingStore.open(store_root), log)
            summary["index"] = _index_outcome(summary["indexes"])
    finally:
        lock.release()
    return summary


def _update_indexes(store: Any, log: Callable[[str], None] | None) -> dict[str, str]:
    """The removed rows leave every index (retinacli.vector_index.after_rows_removed)."""
    from retinacli.vector_index import after_rows_removed

    return after_rows_removed(store, log=log)


def _index_outcome(outcome: dict[str, str]) -> str:
    """One word for the summary: "stale" (a server index still holds the rows) before "dropped" before
    "updated"; "none" when the store had no index."""
    return next((w for w in ("stale", "dropped", "updated") if w in outcome.values()), "none")


def _split_errors(path: Path, tokens: set[str]) -> tuple[int, list[list[str]]]:
    """(rows of errors.csv naming one of `tokens`, the rows kept, header first)."""
    if not tokens or not path.is_file():
        return 0, []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return 0, []
    kept = [rows[0]] + [r for r in rows[1:] if not any(t in cell for t in tokens for cell in r)]
    return len(rows) - len(kept), kept


def _write_errors(path: Path, rows: list[list[str]]) -> None:
    from retinacli.fsutil import atomic_write_bytes

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def prune_selector(store: Any, secret: bytes, notes: list[str]) -> Selector:
    """Rows whose source changed (its key no longer matches) or vanished, found by discovering the
    sources under each recorded root as `retina embed` does. A root that is not there or holds no
    readable source (an unmounted drive looks so), or whose recorded path is redacted, keeps its rows,
    with a note; so do rows written before store format 3 (no root to look under)."""
    from retinacli.pipeline import _legacy_key, discover_with_readers, source_identity, source_key
    from retinacli.privacy import pseudonym
    from retinacli.redaction import absolute

    checked: dict[str, set[str]] = {}  # root id -> keys of the sources there now
    for root in store.roots:
        where = absolute(root.path)
        if root.path_key and pseudonym(where, secret, prefix="r", length=16) != root.path_key:
            notes.append(f"root {root.id}: its recorded path is redacted, its rows were not checked")
            continue
        if not os.path.exists(where):
            notes.append(f"root {root.id} ({where}) is not there (moved, or a drive not mounted?): "
                         "its rows were kept")
            continue
        sources, _errors = discover_with_readers([Path(where)])
        if not sources:  # an empty mount point looks like this: never read it as "every file vanished"
            notes.append(f"root {root.id} ({where}) holds no readable sources now: its rows were kept")
            continue
        keys: set[str] = set()
        for source in sources:
            try:
                keys.add(source_key(source_identity(source), secret))
            except OSError:
                continue  # vanished between discovery and stat
            legacy = _legacy_key(source, secret)
            if legacy:
                keys.add(legacy)
        checked[root.id] = keys

    def select(meta: dict[str, list[Any]]) -> list[str | None]:
        reasons: list[str | None] = []
        for root_id, path, key in zip(meta["root"], meta["path"], meta["source_key"], strict=True):
            if root_id not in checked or key in checked[root_id]:
                reasons.append(None)
                continue
            root = next(r for r in store.roots if r.id == root_id)
            located = Path(root.base) / str(path or "")
            reasons.append("changed" if path and located.exists() else "vanished")
        return reasons

    unrooted = len(store.paths_without_root())
    if unrooted:
        notes.append(f"{unrooted} rows written before store format 3 name no root and were not checked")

    return select
