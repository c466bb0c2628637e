"""What every search-index backend (faiss, LanceDB, Qdrant) shares: row keys, the rows handed to a
backend, the index description written beside it, and the two calls a backend implements.

An index is derived data: the store's npy + parquet shards stay the source of truth. Each backend keeps
one index per modality under ``STORE/ann/<backend>/``; ``<modality>.json`` (IndexInfo) is written last,
after the backend's own files, so it is the commit point and says which shards the index covers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ID_SCHEME = "shard-row-v1"
ROW_BITS = 32  # a key is (shard number << 32) | row within the shard: stable when other shards go


def row_key(shard: int, row: int | np.ndarray) -> np.ndarray | int:
    """The index key of row ``row`` of shard ``shard`` (int64)."""
    return (np.int64(shard) << ROW_BITS) | np.asarray(row, dtype=np.int64) if isinstance(row, np.ndarray) \
        else (int(shard) << ROW_BITS) | int(row)


def split_key(key: int) -> tuple[int, int]:
    """(shard number, row within the shard) of an index key."""
    return int(key) >> ROW_BITS, int(key) & ((1 << ROW_BITS) - 1)


@dataclass
class IndexedRows:
    """A batch of one modality's rows handed to a backend: keys, vectors and the filterable metadata."""

    keys: np.ndarray  # int64 (n,), row_key(shard, row)
    vectors: np.ndarray  # float32 (n, dim), L2-normalised
    laterality: list[str]  # "OD", "OS" or "" (unknown)
    patient: list[str]  # the store's pseudonymous patient id, "" when unknown
    date: np.ndarray  # int32 (n,) YYYYMMDD of the study date, 0 when unknown


@dataclass
class IndexInfo:
    """``STORE/ann/<backend>/<modality>.json``: what an index holds. Written last (the commit point)."""

    backend: str
    modality: str
    model_id: str
    embed_dim: int
    shards: list[int]  # the store shard numbers whose rows of this modality the index holds
    vectors: int
    built: str  # UTC time of the last update
    params: dict[str, Any] = field(default_factory=dict)  # backend's own (nlist, url, collection, ...)
    id_scheme: str = ID_SCHEME

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IndexInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Searcher(Protocol):
    """An index opened for queries (once per `retrieve` run). Only reads."""

    def search(self, queries: np.ndarray, k: int, where: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (Q, k), keys int64 (Q, k)), best first, among rows matching ``where`` (a
        retinacli.vector_index.filters.Filter, or None for all); key -1 / score -inf pad a row with
        fewer than k matches. Scores are cosine similarities (inner products of normalised vectors)."""
        ...


class Backend(Protocol):
    name: str  # "faiss" | "lancedb" | "qdrant"
    extra: str  # the pip extra that installs it: retina[<extra>]
    module: str  # its import name, for availability checks without importing it

    def update(self, folder: Path, name: str, previous: IndexInfo | None, *, dim: int,
               remove_shards: list[int], add: Callable[[], Iterator[IndexedRows]], url: str | None,
               log: Callable[[str], None] | None) -> dict[str, Any]:
        """Bring the index ``name`` (a table / collection name, unique per store and modality: a server
        may hold several stores' indexes) in ``folder`` (created when missing; a local backend keeps its
        files there) up to date and return its params (they must let ``open`` find it again: name, url,
        nlist, ...).

        ``previous`` None: build from scratch (drop whatever the folder or collection holds). Else
        delete every key of the shards in ``remove_shards`` (they may be absent: deletion must be
        idempotent, so a run killed before IndexInfo was written is repaired by the next update),
        then add the rows ``add()`` yields. ``url``: a server (Qdrant) instead of a local path."""
        ...

    def open(self, folder: Path, info: IndexInfo) -> Searcher:
        """Open the index for queries (read only; never creates or changes anything). A missing or
        unreadable index raises retinacli.errors.RetinaError with one line saying why."""
        ...
