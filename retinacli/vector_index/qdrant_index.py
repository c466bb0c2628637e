"""Qdrant index backend (optional extra ``retina[qdrant]``, Apache-2.0): the server option.

With ``url`` the index is a collection on a Qdrant server (``retina store index --backend qdrant --url
URL``; the API key, if the server needs one, comes from the QDRANT_API_KEY environment variable and is
never written into the store). Without it, the client's local mode keeps the collection in
``STORE/ann/qdrant/qdrant``: an in-process, brute-force, single-process store meant for tests and small
stores (the whole collection is loaded into memory, and only one process may open it at a time), not a
performance target. Correctness here is tested against local mode only; no server was available.

One collection per store and modality (its name comes from the registry, unique per store), cosine
distance, point id = the row key (keys are >= 0), payload laterality / patient / date (YYYYMMDD int)
plus ``shard`` so the rows of a dropped shard are deleted with one filter. On a server the payload
fields are indexed (keyword, keyword, integer, integer) so filtered HNSW search is a pre-filter: the
top-k among matching points.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import RetinaError, first_line, require
from retinacli.vector_index.base import ROW_BITS, IndexedRows, IndexInfo
from retinacli.vector_index.filters import Filter

BATCH = 1024  # points per upsert request
LOCAL_DIR = "qdrant"  # local mode's folder inside STORE/ann/qdrant
HNSW_EF = 128  # server search: candidates kept per query (Qdrant's default is the index's ef_construct)
API_KEY_ENV = "QDRANT_API_KEY"
LOCAL_LARGE = 20_000  # above this the client warns that local mode is slow; we say it once, our way


def _qdrant():
    require("the Qdrant index", "qdrant", "qdrant_client")
    import qdrant_client
    from qdrant_client import models

    return qdrant_client, models


def _where(models, where: Filter | None):
    """A Qdrant payload filter with the rows of Filter.mask, None for no filter."""
    if where is None or where.is_empty():
        return None
    must = []
    if where.laterality is not None:
        must.append(models.FieldCondition(key="laterality", match=models.MatchValue(value=where.laterality)))
    if where.patient is not None:
        must.append(models.FieldCondition(key="patient", match=models.MatchValue(value=where.patient)))
    if where.date_from is not None or where.date_to is not None:
        must.append(models.FieldCondition(key="date", range=models.Range(
            gte=where.date_from,
            lte=where.date_to,
            gt=0 if where.date_to is not None else None,  # an unknown date (0) fails any upper bound
        )))
    return models.Filter(must=must)


def _client(folder: Path, url: str | None, *, create: bool):
    qdrant_client, _ = _qdrant()
    try:
        if url:
            return qdrant_client.QdrantClient(url=url, api_key=os.environ.get(API_KEY_ENV) or None)
        path = Path(folder) / LOCAL_DIR
        if not create and not path.is_dir():
            raise RetinaError(f"the Qdrant index is missing ({path}); 'retina store index' builds it")
        return qdrant_client.QdrantClient(path=str(path))
    except RuntimeError as exc:  # local mode: another client holds the folder's lock
        raise RetinaError(f"the Qdrant index in {Path(folder) / LOCAL_DIR} is in use (local mode allows one "
                          "client at a time: another retina process, or a search still open)") from exc


def _defer_local_syncs(client) -> bool:
    """Local mode commits one sqlite transaction per point, each synced to disk (~12 ms on a busy
    disk: minutes for a few thousand points). During an update the syncs are turned off and the files
    synced once at the end (_sync_local), before the IndexInfo that commits the update is written. A
    killed process still leaves every transaction whole; only a power cut mid-update can damage the
    file, and then the next update rebuilds it. Reaches into the client's local storage; a client
    laid out differently just keeps its per-point syncs."""
    deferred = False
    for collection in getattr(getattr(client, "_client", None), "collections", {}).values():
        connection = getattr(getattr(collection, "storage", None), "storage", None)
        if isinstance(connection, sqlite3.Connection):
            connection.execute("PRAGMA synchronous=OFF")
            deferred = True
    return deferred


def _sync_local(folder: Path) -> None:
    for path in (Path(folder) / LOCAL_DIR).rglob("*.sqlite"):
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())


class QdrantSearcher:
    """A Qdrant collection opened for queries."""

    def __init__(self, client, collection: str, server: bool):
        self.client = client
        self.collection = collection
        self.server = server
        # closed when dropped or at exit (local mode holds a lock on its folder until then); a close
        # left to interpreter shutdown prints an ignored-exception trace
        self._finalizer = weakref.finalize(self, client.close)

    def search(self, queries: np.ndarray, k: int,
               where: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        _, models = _qdrant()
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        keys = np.full((len(q), k), -1, dtype=np.int64)
        if len(q) == 0 or k <= 0:
            return scores, keys
        condition = _where(models, where)
        params = models.SearchParams(hnsw_ef=max(HNSW_EF, k)) if self.server else None
        requests = [models.QueryRequest(query=row.tolist(), filter=condition, limit=int(k), params=params,
                                        with_payload=False, with_vector=False) for row in q]
        try:
            responses = self.client.query_batch_points(self.collection, requests=requests)
        except Exception as exc:  # unreachable server, dropped collection: one line
            raise RetinaError(f"the Qdrant index search failed ({first_line(exc)})") from exc
        for i, response in enumerate(responses):
            points = response.points[:k]
            keys[i, : len(points)] = [int(p.id) for p in points]
            scores[i, : len(points)] = [float(p.score) for p in points]
        return scores, keys

    def close(self) -> None:
        """Release the client (local mode: its folder lock)."""
        self._finalizer()


class QdrantBackend:
    """retinacli.vector_index.base.Backend for Qdrant: a server (``url``) or the client's local mode."""

    name = "qdrant"
    extra = "qdrant"
    module = "qdrant_client"

    def update(self, folder: Path, name: str, previous: IndexInfo | None, *, dim: int,
               remove_shards: list[int], add: Callable[[], Iterator[IndexedRows]], url: str | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Bring collection ``name`` up to date (see Backend.update): on the server ``url``, or in
        local mode under ``folder``."""
        _, models = _qdrant()
        folder = Path(folder)
        if previous is None and not url:
            shutil.rmtree(folder / LOCAL_DIR, ignore_errors=True)  # from scratch: nothing stale stays
        folder.mkdir(parents=True, exist_ok=True)
        client = _client(folder, url, create=True)
        where = f"on {url}" if url else f"in {folder / LOCAL_DIR}"
        try:
            with warnings.catch_warnings():
                # local mode warns about payload indexes and sizes; the docstring says what it is for
                warnings.simplefilter("ignore", UserWarning)
                params = self._update(client, models, name, previous, dim, remove_shards, add, url, log)
        except RetinaError:
            raise
        except Exception as exc:  # a server error, a refused key: one line naming the collection
            raise RetinaError(f"the Qdrant collection {name} {where} could not be updated "
                              f"({first_line(exc)})") from exc
        finally:
            client.close()
        if not url:
            _sync_local(folder)
        return params

    def _update(self, client, models, name, previous, dim, remove_shards, add, url, log) -> dict[str, Any]:
        exists = client.collection_exists(name)
        if previous is None or not exists:
            if previous is not None:  # the registry rebuilds from scratch on this error
                raise RetinaError(f"the Qdrant collection {name} is missing")
            if exists:
                client.delete_collection(name)
            client.create_collection(name, vectors_config=models.VectorParams(
                size=int(dim), distance=models.Distance.COSINE))
            if url:
                for field, kind in (("laterality", models.PayloadSchemaType.KEYWORD),
                                    ("patient", models.PayloadSchemaType.KEYWORD),
                                    ("date", models.PayloadSchemaType.INTEGER),
                                    ("shard", models.PayloadSchemaType.INTEGER)):
                    client.create_payload_index(name, field_name=field, field_schema=kind)
            remove_shards = []
        else:
            size = client.get_collection(name).config.params.vectors.size
            if int(size) != int(dim):
                raise RetinaError(f"the Qdrant collection {name} holds {size}-d vectors, not {dim}-d")
        if not url:
            _defer_local_syncs(client)
        if remove_shards:
            shards = sorted({int(s) for s in remove_shards})
            # deleting absent points is a no-op, so a repeated delete is harmless
            client.delete(name, points_selector=models.FilterSelector(filter=models.Filter(must=[
                models.FieldCondition(key="shard", match=models.MatchAny(any=shards))])), wait=True)
        for rows in add():
            vectors = np.ascontiguousarray(rows.vectors, dtype=np.float32)
            keys = np.asarray(rows.keys, dtype=np.int64)
            for start in range(0, len(keys), BATCH):
                part = slice(start, start + BATCH)
                payloads = [{"laterality": (lat or "").upper(), "patient": pat or "", "date": int(day),
                             "shard": int(key) >> ROW_BITS}
                            for lat, pat, day, key in zip(rows.laterality[part], rows.patient[part],
                                                          rows.date[part], keys[part], strict=True)]
                client.upsert(name, points=models.Batch(ids=[int(k) for k in keys[part]],
                                                        vectors=vectors[part].tolist(), payloads=payloads),
                              wait=True)
        total = int(client.count(name, exact=True).count)
        if log and not url and total > LOCAL_LARGE:
            log(f"note: the Qdrant index holds {total} points in local mode (in memory, one process at a "
                "time); a Qdrant server (--url) or --backend lancedb suits a store this size")
        return {"collection": name, "url": url or None, "mode": "server" if url else "local",
                "distance": "cosine", "hnsw_ef": HNSW_EF if url else None, "points": total}

    def open(self, folder: Path, info: IndexInfo) -> QdrantSearcher:
        """Open the collection ``info`` names (on its server, or in local mode), read only."""
        url = info.params.get("url")
        name = info.params.get("collection")
        if not name:
            raise RetinaError(f"the Qdrant {info.modality} index description names no collection; "
                              "'retina store index' rebuilds it")
        client = _client(Path(folder), url, create=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                found = client.collection_exists(name)
        except Exception as exc:
            client.close()
            raise RetinaError(f"the Qdrant {info.modality} index on {url} cannot be reached "
                              f"({first_line(exc)})") from exc
        if not found:
            client.close()
            place = url or str(Path(folder) / LOCAL_DIR)
            raise RetinaError(f"the Qdrant {info.modality} index is missing (no collection {name} in "
                              f"{place}); 'retina store index' rebuilds it")
        return QdrantSearcher(client, name, server=bool(url))
