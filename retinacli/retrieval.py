"""Exact cosine search over a store: one matrix product per memory-mapped shard, top-k merged.

Vectors are L2-normalised, so the dot product is the cosine similarity. A shard is scored in
row blocks, so memory stays bounded by the block, not the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.store import EmbeddingStore

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
) -> list[Hit]:
    """The `top_k` rows most similar to `query` among rows of modality `target` (all when None) and
    the given laterality, best first (ties broken by store order).

    `method="ann"` searches the store's approximate index (retinacli.ann; needs a target modality;
    a RetinaError when no current index exists) and falls back to exact search when the filters
    leave fewer than `top_k` of its candidates."""
    query = normalise(query)
    if query.shape[0] != store.embed_dim:
        raise ValueError(f"query has {query.shape[0]} dimensions, the store {store.embed_dim}")
    top_k = max(1, int(top_k))
    if method == "ann" and target is not None:
        hits = _ann_search(store, query, target, laterality, top_k, exclude_ids or set(), log)
        if hits is not None:
            return hits
    best_scores = np.zeros(0, dtype=np.float32)
    best_rows: list[dict[str, Any]] = []
    columns = [*RESULT_COLUMNS, "patient", "study"]
    for _shard, vectors, meta in store.iter_shards(columns):
        keep = np.ones(len(meta["id"]), dtype=bool)
        if target is not None:
            keep &= np.array([m == target for m in meta["modality"]], dtype=bool)
        if laterality is not None:
            wanted = laterality.upper()
            keep &= np.array([(v or "").upper() == wanted for v in meta["laterality"]], dtype=bool)
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


def _ann_search(store: EmbeddingStore, query: np.ndarray, target: str, laterality: str | None, top_k: int,
                exclude_ids: set[str], log: Any) -> list[Hit] | None:
    """Top-k from the ANN index, filtered; None when the filters leave too few candidates."""
    from retinacli.ann import current_index, rows_by_global_id, search_index

    index = current_index(store, target)  # read only: indexes are built by writers (retinacli.ann)
    wanted = (top_k + len(exclude_ids)) * (4 if laterality else 1)
    scores, ids = search_index(index, query[None], min(wanted, index.ntotal))
    found = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
    columns = [*RESULT_COLUMNS, "patient", "study"]
    rows = rows_by_global_id(store, [i for _, i in found], columns)
    hits: list[Hit] = []
    for score, gid in found:
        row = rows[gid]
        if laterality is not None and (row["laterality"] or "").upper() != laterality.upper():
            continue
        if row["id"] in exclude_ids:
            continue
        hits.append(Hit(len(hits) + 1, score, row))
        if len(hits) == top_k:
            return hits
    return None if len(found) < index.ntotal else hits
