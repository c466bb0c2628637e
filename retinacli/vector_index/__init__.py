"""Search indexes over an embedding store: which backends exist, and keeping their indexes current.

An index is derived data (the npy + parquet shards stay the source of truth). Layout::

    STORE/ann/active.json            {"backend": NAME}: the index `retrieve` uses (the last one built)
    STORE/ann/<backend>/             that backend's files (faiss, lancedb; qdrant's local mode)
    STORE/ann/<backend>/<modality>.json   its IndexInfo (base.py), written last: the commit point

Only writers change an index (``retina store index``, ``retina embed`` after it commits, ``store
remove`` / ``prune`` / ``repair``), under the store's lock; queries only read, so a read-only command
never writes into a store. An index is current when it covers exactly the committed shards: shard
numbers are never reused, so an update removes the keys of shards no longer listed and adds the rows
of new ones. ``STORE/ann/<modality>.faiss`` + ``<modality>.json`` (retina before the backends) is a
legacy index: never used for search, removed by the next update.
"""

from __future__ import annotations

import hmac
import importlib
import importlib.util
import json
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import RetinaError, UsageError, require
from retinacli.vector_index.base import IndexedRows, IndexInfo, row_key, split_key
from retinacli.vector_index.filters import Filter, date_number

BACKEND_NAMES = ("lancedb", "faiss", "qdrant")
ANN_DIR = "ann"
ACTIVE_FILE = "active.json"
# `retrieve --search auto` suggests an index, and `retina embed` builds one, from this many vectors of
# a modality: below it exact search answers in well under a second (benchmarks/RESULTS.md).
AUTO_MIN_ROWS = 200_000
SEARCH_METHODS = ("auto", "exact", "ann")
META_COLUMNS = ["modality", "laterality", "patient", "date"]

# name -> (module, class, pip extra, import name)
_BACKENDS = {
    "lancedb": ("retinacli.vector_index.lancedb_index", "LanceBackend", "lancedb", "lancedb"),
    "faiss": ("retinacli.vector_index.faiss_index", "FaissBackend", "faiss", "faiss"),
    "qdrant": ("retinacli.vector_index.qdrant_index", "QdrantBackend", "qdrant", "qdrant_client"),
}

Log = Callable[[str], None] | None


# --- backends -------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in _BACKENDS:
        raise UsageError(f"unknown index backend {name!r} (use {', '.join(BACKEND_NAMES)})")


def installed(name: str) -> bool:
    """Whether the backend's library is installed (looked up, not imported)."""
    _check_name(name)
    try:
        return importlib.util.find_spec(_BACKENDS[name][3]) is not None
    except (ImportError, ValueError):
        return False


def get_backend(name: str):
    """The backend ``name`` (a Backend, base.py); a one-line MissingExtraError when its extra is absent."""
    _check_name(name)
    module, cls, extra, import_name = _BACKENDS[name]
    require(f"the {name} index", extra, import_name)
    return getattr(importlib.import_module(module), cls)()


def default_backend() -> str | None:
    """lancedb when installed, else faiss when installed, else None (qdrant needs a choice: a server)."""
    return next((n for n in ("lancedb", "faiss") if installed(n)), None)


def index_name(store: Any) -> str:
    """``retina_<tag>_`` prefix base: the tag is keyed with the store's secret, so it is unique per store
    and reveals nothing (a server may hold the indexes of several stores)."""
    secret = getattr(store, "secret", None)
    if secret is None:
        from retinacli.privacy import load_secret

        secret = load_secret(Path(store.root))
    return "retina_" + hmac.new(secret, b"index-name", "sha256").hexdigest()[:12]


# --- reading the index descriptions -----------------------------------------------------------------


def _ann(store_or_root: Any) -> Path:
    return Path(getattr(store_or_root, "root", store_or_root)) / ANN_DIR


def backend_folder(store: Any, backend: str) -> Path:
    return _ann(store) / backend


def active_backend(store: Any) -> str | None:
    """The backend named by STORE/ann/active.json, or None."""
    try:
        name = json.loads((_ann(store) / ACTIVE_FILE).read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in _BACKENDS else None


def read_info(store: Any, backend: str, modality: str) -> IndexInfo | None:
    """The IndexInfo of ``backend``'s ``modality`` index, or None when missing or unreadable."""
    try:
        return IndexInfo.from_json(json.loads((_ann(store) / backend / f"{modality}.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def infos(store: Any) -> list[IndexInfo]:
    """Every readable index description under STORE/ann (new layout), backend then modality order."""
    found = []
    for backend in BACKEND_NAMES:
        folder = _ann(store) / backend
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                info = read_info(store, backend, path.stem)
                if info is not None:
                    found.append(info)
    return found


def legacy_files(store: Any) -> list[Path]:
    """An earlier retina's index files (STORE/ann/<modality>.faiss / .json): never used for search."""
    folder = _ann(store)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != ACTIVE_FILE
                  and (p.suffix in (".faiss", ".json") or p.name.endswith(".tmp")))


def remove_legacy(store: Any) -> list[str]:
    """Delete the legacy index files; returns them relative to the store."""
    removed = []
    for path in legacy_files(store):
        path.unlink(missing_ok=True)
        removed.append(f"{ANN_DIR}/{path.name}")
    return removed


def _shard_numbers(store: Any) -> set[int]:
    return {s.index for s in store.shards}


def staleness(store: Any, info: IndexInfo) -> str | None:
    """None when ``info`` covers exactly the store's committed shards with its model, else why not."""
    if info.model_id != store.model_id or int(info.embed_dim) != int(store.embed_dim):
        return f"it was built with another model ({info.model_id})"
    covered, shards = set(info.shards), _shard_numbers(store)
    if covered == shards:
        return None
    added, removed = len(shards - covered), len(covered - shards)
    return f"the store changed since it was built: {added} shards added, {removed} removed"


def index_status(store: Any) -> list[dict[str, Any]]:
    """`retina store info`'s list: {backend, modality, vectors, current, why, active, url} per index,
    and a legacy index as backend "legacy"."""
    active = active_backend(store)
    out = []
    for info in infos(store):
        why = staleness(store, info)
        out.append({"backend": info.backend, "modality": info.modality, "vectors": int(info.vectors),
                    "current": why is None, "why": why, "active": info.backend == active,
                    "url": info.params.get("url"), "built": info.built})
    for path in legacy_files(store):
        if path.suffix == ".json":
            out.append({"backend": "legacy", "modality": path.stem, "vectors": None, "current": False,
                        "why": "an earlier retina's index: never used; 'retina store index' replaces it",
                        "active": False, "url": None, "built": None})
    return out


# --- queries --------------------------------------------------------------------------------------


def modality_counts(store: Any) -> dict[str, int]:
    """Rows per modality in the committed shards."""
    counts: dict[str, int] = {}
    for shard in store.shards:
        for kind in store.shard_metadata(shard, ["modality"])["modality"]:
            counts[str(kind)] = counts.get(str(kind), 0) + 1
    return counts


def _build_hint(store: Any) -> str:
    return f"'retina store index --store {store.root}'"


def search_plan(store: Any, requested: str, target: str) -> tuple[str, str | None]:
    """(method, one-line note or None) for searching ``target`` items.

    ``exact``: exact. ``ann``: the active index when it is current, else a RetinaError saying why and
    what fixes it (no silent fallback: the user asked for it). ``auto``: the active index when current;
    otherwise exact, with a note when an index is out of date, or when there is none and the target has
    AUTO_MIN_ROWS vectors or more. Only reads."""
    if requested not in SEARCH_METHODS:
        raise UsageError(f"unknown search method {requested!r} (use auto, exact or ann)")
    if requested == "exact":
        return "exact", None
    backend = active_backend(store)
    info = read_info(store, backend, target) if backend else None
    if info is None:
        if requested == "ann":
            raise RetinaError(f"{store.root}: no {target} ANN index; build it with {_build_hint(store)} "
                              "(or search with --search exact)")
        if modality_counts(store).get(target, 0) >= AUTO_MIN_ROWS:
            return "exact", (f"note: the store holds no {target} index, so the search is exact; "
                             f"{_build_hint(store)} builds one (faster at this size)")
        return "exact", None
    why = staleness(store, info)
    if why is None and not installed(backend):
        if requested == "ann":
            get_backend(backend)  # the one-line MissingExtraError
        return "exact", (f"note: the {backend} {target} index needs retina[{_BACKENDS[backend][2]}], "
                         "which is not installed, so the search is exact")
    if why is None:
        return "ann", None
    what = f"the {backend} {target} index is out of date ({why})"
    if requested == "ann":
        raise RetinaError(f"{store.root}: {what}; {_build_hint(store)} updates it "
                          "(or search with --search exact)")
    return "exact", f"note: {what}, so the search is exact; 'retina store index' updates it"


def open_searcher(store: Any, target: str):
    """The active index of ``target`` opened for queries (a Searcher, base.py). Only reads; call
    search_plan first (it says whether the index is current)."""
    backend = active_backend(store)
    info = read_info(store, backend, target) if backend else None
    if info is None:
        raise RetinaError(f"{store.root}: no {target} ANN index; build it with {_build_hint(store)}")
    return get_backend(backend).open(backend_folder(store, backend), info)


def rows_for_keys(store: Any, keys: Any, columns: list[str]) -> dict[int, dict[str, Any]]:
    """Metadata rows for index keys, reading only the shards that hold them. Keys of shards the store
    no longer lists (and pads, -1) are left out."""
    wanted: dict[int, list[int]] = {}
    for key in keys:
        if int(key) >= 0:
            shard, _row = split_key(int(key))
            wanted.setdefault(shard, []).append(int(key))
    out: dict[int, dict[str, Any]] = {}
    for shard in store.shards:
        if shard.index in wanted:
            meta = store.shard_metadata(shard, columns)
            for key in wanted[shard.index]:
                row = split_key(key)[1]
                if row < shard.rows:
                    out[key] = {c: meta[c][row] for c in columns}
    return out


# --- writing --------------------------------------------------------------------------------------


def _rows(store: Any, shards: list[Any], modality: str) -> Callable[[], Iterator[IndexedRows]]:
    """What a backend's update adds: ``modality``'s rows of ``shards``, one IndexedRows per shard."""

    def add() -> Iterator[IndexedRows]:
        for shard in shards:
            meta = store.shard_metadata(shard, META_COLUMNS)
            rows = np.flatnonzero(np.array([m == modality for m in meta["modality"]], dtype=bool))
            if not len(rows):
                continue
            vectors = np.ascontiguousarray(np.asarray(store.shard_vectors(shard))[rows], dtype=np.float32)
            yield IndexedRows(
                keys=row_key(shard.index, rows.astype(np.int64)),
                vectors=vectors,
                laterality=[_eye(meta["laterality"][r]) for r in rows],
                patient=[str(meta["patient"][r] or "") for r in rows],
                date=np.array([date_number(meta["date"][r]) for r in rows], dtype=np.int32),
            )

    return add


def _eye(value: Any) -> str:
    eye = str(value or "").upper()
    return eye if eye in ("OD", "OS") else ""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def update_indexes(store: Any, backend: str | None = None, modalities: list[str] | None = None,
                   url: str | None = None, log: Log = None, *, activate: bool = True) -> dict[str, int]:
    """Build or bring up to date ``backend``'s indexes (default: the active one, else default_backend())
    for ``modalities`` (default: every modality with rows, plus those indexed before); returns
    {modality: vectors indexed}. The caller holds the store's writer lock.

    Per modality: the keys of shards no longer committed, and of shards about to be added (a killed
    update may have added them already), are deleted; the rows of committed shards the index does not
    cover are added; then its IndexInfo is written (the commit point). ``activate``: name this backend
    in STORE/ann/active.json and delete a legacy index."""
    from retinacli.fsutil import atomic_write_json

    name = backend or active_backend(store) or default_backend()
    if name is None:
        raise RetinaError("no index backend installed: pip install 'retina[lancedb]' (or retina[faiss])")
    impl = get_backend(name)
    folder = backend_folder(store, name)
    counts = modality_counts(store)
    before = {i.modality for i in infos(store) if i.backend == name}
    wanted = sorted(modalities if modalities is not None else {m for m, n in counts.items() if n} | before)
    committed = sorted(store.shards, key=lambda s: s.index)
    numbers = {s.index for s in committed}
    prefix = index_name(store)
    done: dict[str, int] = {}
    for modality in wanted:
        previous = read_info(store, name, modality)
        if previous is not None and (previous.model_id != store.model_id
                                     or int(previous.embed_dim) != int(store.embed_dim)
                                     or (url is not None and previous.params.get("url") != url)):
            previous = None  # another model or another server: built afresh
        target_url = url if url is not None else (previous.params.get("url") if previous else None)
        covered = set(previous.shards) if previous else set()
        new = [s for s in committed if s.index not in covered]
        gone = sorted(covered - numbers)
        if previous is not None and not new and not gone:
            done[modality] = int(previous.vectors)
            continue
        if previous is None and not counts.get(modality):
            continue  # nothing to index, nothing indexed before
        if log:
            verb = "updating" if previous is not None else "building"
            log(f"{verb} the {name} {modality} index ({sum(s.rows for s in new)} rows of {len(new)} shards "
                f"to add, {len(gone)} shards to remove)")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            params = impl.update(folder, f"{prefix}_{modality}", previous, dim=int(store.embed_dim),
                                 remove_shards=sorted(set(gone) | {s.index for s in new}) if previous else [],
                                 add=_rows(store, new, modality), url=target_url, log=log)
        except RetinaError:
            if previous is None:
                raise
            # its files are missing or unreadable: built afresh from the store (the source of truth)
            if log:
                log(f"the {name} {modality} index could not be updated; building it afresh")
            params = impl.update(folder, f"{prefix}_{modality}", None, dim=int(store.embed_dim),
                                 remove_shards=[], add=_rows(store, committed, modality), url=target_url,
                                 log=log)
        info = IndexInfo(backend=name, modality=modality, model_id=store.model_id,
                         embed_dim=int(store.embed_dim), shards=sorted(numbers),
                         vectors=int(counts.get(modality, 0)), built=_now(), params=dict(params or {}))
        atomic_write_json(folder / f"{modality}.json", info.to_json())
        if hasattr(impl, "committed"):  # optional: drop what only the previous description named
            impl.committed(folder, info)
        done[modality] = info.vectors
    if activate and (done or any(i.backend == name for i in infos(store))):  # an empty store: nothing to name
        _ann(store).mkdir(exist_ok=True)
        atomic_write_json(_ann(store) / ACTIVE_FILE, {"backend": name})
        remove_legacy(store)
    return done


def _one_line(exc: BaseException) -> str:
    """An error as one short line (a library's message may span lines)."""
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    if isinstance(exc, RetinaError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def after_commit(store: Any, log: Log = None) -> None:
    """`retina embed`, after it committed: update the active index when its extra is installed; with
    no index, build one with default_backend() once a modality reaches AUTO_MIN_ROWS (or when an
    earlier retina's legacy index was there). A failure is a one-line note: the index stays stale and
    retrieve falls back to exact search."""
    say = log or (lambda _m: None)
    active = active_backend(store)
    try:
        if active is not None and any(i.backend == active for i in infos(store)):
            if not installed(active):
                say(f"note: the {active} index was not updated ({_BACKENDS[active][3]} is not installed); "
                    "retrieve searches exactly until 'retina store index' updates it")
                return
            update_indexes(store, active, log=log)
            return
        large = max(modality_counts(store).values(), default=0) >= AUTO_MIN_ROWS
        if (large or legacy_files(store)) and default_backend() is not None:
            update_indexes(store, default_backend(), log=log)
    except Exception as exc:  # vectors committed; only the index lags, whatever failed
        reason = _one_line(exc)
        say(f"note: the search index was not updated ({reason}); retrieve searches exactly until "
            "'retina store index' updates it")


def after_rows_removed(store: Any, log: Log = None) -> dict[str, str]:
    """After rows left the store (`store remove` / `prune` / `repair`): no index may keep them.

    Every index (not only the active one) is brought up to date: a local one is rebuilt from the store
    (its old files deleted first, as a deleted row can survive in them), a Qdrant server's has the
    dropped shards' keys deleted. A local index that cannot be rebuilt (its extra missing) stays
    deleted; a server that cannot be reached is reported loudly (it still holds the rows, and is stale).
    A legacy index is deleted. Returns {backend: "updated" | "dropped" | "stale"}."""
    say = log or (lambda _m: None)
    outcome: dict[str, str] = {}
    active = active_backend(store)
    for backend in BACKEND_NAMES:
        held = [i for i in infos(store) if i.backend == backend]
        folder = backend_folder(store, backend)
        if not held:
            if folder.is_dir():  # files without a description: a killed build's, unused
                shutil.rmtree(folder, ignore_errors=True)
            continue
        servers = sorted({str(i.params["url"]) for i in held if i.params.get("url")})
        try:
            if not servers:
                # A deleted row can survive inside a backend's files (LanceDB's deletion vectors, freed
                # SQLite pages): a local index is rebuilt from the store, so no byte of it remains.
                shutil.rmtree(folder, ignore_errors=True)
            update_indexes(store, backend, modalities=[i.modality for i in held], log=log, activate=False)
            outcome[backend] = "updated"
            continue
        except Exception as exc:  # whatever failed, the removed rows must not stay
            reason = _one_line(exc)
        if servers:
            say(f"WARNING: the {backend} index on {', '.join(servers)} could not be updated ({reason}); it "
                "still holds the removed rows: run 'retina store index --backend qdrant' when it is "
                "reachable (retrieve does not use it meanwhile)")
            outcome[backend] = "stale"
        else:
            shutil.rmtree(folder, ignore_errors=True)
            say(f"note: the {backend} index was deleted ({reason}); 'retina store index' rebuilds it")
            outcome[backend] = "dropped"
            if active == backend:
                (_ann(store) / ACTIVE_FILE).unlink(missing_ok=True)
    if remove_legacy(store):
        outcome["legacy"] = "dropped"
    return outcome


__all__ = [
    "ACTIVE_FILE", "ANN_DIR", "AUTO_MIN_ROWS", "BACKEND_NAMES", "Filter", "IndexInfo", "IndexedRows",
    "active_backend", "after_commit", "after_rows_removed", "default_backend", "get_backend", "index_name",
    "index_status", "infos", "installed", "modality_counts", "open_searcher", "read_info", "rows_for_keys",
    "search_plan", "update_indexes",
]
