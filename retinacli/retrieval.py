"""Exact cosine search over a store: one matrix product per memory-mapped shard, top-k merged.

Vectors are L2-normalised, so the dot product is the cosine similarity. A shard is scored in
row blocks, so memory stays bounded by the block, not the store.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.store import EmbeddingStore
from retinacli.vector_index.filters import Filter, date_number

BLOCK_ROWS = 65536
OTHER_MODALITY = {"oct": "fundus", "fundus": "oct"}
RESULT_COLUMNS = ["id", "root", "path", "modality", "laterality", "date", "ood_score", "ood"]


@dataclass
class Hit:
    rank: int
    score: float
    row: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "score": round(float(self.score), 6),
            "id": self.row.get("id"),
            "path": self.row.get("path"),
            "modality": self.row.get("modality"),
            "laterality": self.row.get("laterality"),
            "date": _iso_date(self.row.get("date")),
            # out of distribution for the package (retinacli.ood): null in rows of store format < 4
            "ood_score": self.row.get("ood_score"),
            "ood": self.row.get("ood"),
        }


EYES = ("OD", "OS")


def same_eye(query_patient: str | None, query_laterality: str | None, row: dict[str, Any]) -> bool | None:
    """Whether a result is the query's own eye: True for the same pseudonymous patient (store column
    `patient`) and laterality, False otherwise, None when either side's patient or eye is unknown."""
    eyes = [(v or "").upper() for v in (query_laterality, row.get("laterality"))]
    if not query_patient or not row.get("patient") or any(e not in EYES for e in eyes):
        return None
    return query_patient == row["patient"] and eyes[0] == eyes[1]


def _iso_date(value: Any) -> str | None:
    """A stored date as YYYY-MM-DD (stores written by 0.1.0 hold YYYYMMDD)."""
    from retinacli.readers.sanitize import iso_date

    return iso_date(value)


def display_path(path: str | None) -> str:
    """A stored absolute path as the user would type it: relative when under the current folder."""
    if not path:
        return ""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def normalise(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def search(
    store: EmbeddingStore,
    query: np.ndarray,
    *,
    target: str | None = None,
    laterality: str | None = None,
    top_k: int = 10,
    exclude_ids: set[str] | None = None,
    method: str = "exact",
    log: Any = None,
    where: Filter | None = None,
    searcher: Any = None,
) -> list[Hit]:
    """The `top_k` rows most similar to `query` among rows of modality `target` (all when None) that
    match the filter (`where`: eye, pseudonymous patient, date range; `laterality` is a shorthand for
    its eye), best first (ties broken by store order).

    `method="ann"` searches the store's active index (retinacli.vector_index; needs a target modality;
    `searcher`: that index already opened, else it is opened here; a RetinaError when there is none).
    The filter applies before the top k are chosen on both paths (pre-filtering); when the index
    returns fewer than `top_k` rows, the search is done exactly instead (so the list is complete)."""
    query = normalise(query)
    if query.shape[0] != store.embed_dim:
        raise ValueError(f"query has {query.shape[0]} dimensions, the store {store.embed_dim}")
    top_k = max(1, int(top_k))
    where = _with_eye(where, laterality)
    if method == "ann" and target is not None:
        hits = _ann_search(store, query, target, where, top_k, exclude_ids or set(), searcher)
        if len(hits) == top_k:
            return hits
        # fewer than asked for (a k beyond the cells probed, or few matching rows): exact is complete
    best_scores = np.zeros(0, dtype=np.float32)
    best_rows: list[dict[str, Any]] = []
    columns = [*RESULT_COLUMNS, "patient", "study"]
    for _shard, vectors, meta in store.iter_shards(columns):
        keep = np.ones(len(meta["id"]), dtype=bool)
        if target is not None:
            keep &= np.array([m == target for m in meta["modality"]], dtype=bool)
        if where is not None and not where.is_empty():
            dates = np.array([date_number(d) for d in meta["date"]] if where.date_from is not None
                             or where.date_to is not None else np.zeros(len(keep)), dtype=np.int64)
            keep &= where.mask(meta["laterality"], meta["patient"], dates)
        if exclude_ids:
            keep &= np.array([i not in exclude_ids for i in meta["id"]], dtype=bool)
        candidates = np.flatnonzero(keep)
        for start in range(0, len(candidates), BLOCK_ROWS):
            rows = candidates[start : start + BLOCK_ROWS]
            scores = np.asarray(vectors[rows], dtype=np.float32) @ query
            if len(scores) > top_k:
                part = np.argpartition(-scores, top_k - 1)[:top_k]
                rows, scores = rows[part], scores[part]
            merged_scores = np.concatenate([best_scores, scores])
            merged_rows = best_rows + [{c: meta[c][r] for c in columns} for r in rows]
            order = np.argsort(-merged_scores, kind="stable")[:top_k]
            best_scores = merged_scores[order]
            best_rows = [merged_rows[i] for i in order]
    ranked = zip(best_scores, best_rows, strict=True)
    return [Hit(rank + 1, float(score), row) for rank, (score, row) in enumerate(ranked)]


def _with_eye(where: Filter | None, laterality: str | None) -> Filter | None:
    if laterality is None:
        return where
    return replace(where or Filter(), laterality=laterality.upper())


def _ann_search(store: EmbeddingStore, query: np.ndarray, target: str, where: Filter | None, top_k: int,
                exclude_ids: set[str], searcher: Any) -> list[Hit]:
    """Top-k among the rows matching `where`, from the store's active index (read only)."""
    from retinacli.vector_index import open_searcher, rows_for_keys

    if searcher is None:
        searcher = open_searcher(store, target)
    # excluded ids are few (the query itself): ask for that many more and drop them
    scores, keys = searcher.search(query[None], top_k + len(exclude_ids),
                                   where if where is not None and not where.is_empty() else None)
    found = [(float(s), int(k)) for s, k in zip(scores[0], keys[0], strict=True) if k >= 0]
    columns = [*RESULT_COLUMNS, "patient", "study"]
    rows = rows_for_keys(store, [k for _, k in found], columns)
    hits: list[Hit] = []
    for score, key in found:
        row = rows.get(key)
        if row is None or row["id"] in exclude_ids:
            continue
        hits.append(Hit(len(hits) + 1, score, row))
        if len(hits) == top_k:
            break
    return hits
