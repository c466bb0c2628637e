"""Cross-modal retrieval on held-out patients: fundus→OCT and OCT→fundus top-k, median rank, chance.

Row i of the fundus embeddings pairs with row i of the OCT embeddings (same eye, same visit); the
candidate pool is every held-out pair, so other visits of the same eye are (hard) distractors.
"""

from __future__ import annotations

import numpy as np


def true_match_ranks(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """1-based rank of candidate i for query i under cosine similarity (ties count against the match)."""
    scores = np.asarray(queries, np.float64) @ np.asarray(candidates, np.float64).T
    diagonal = np.diag(scores)[:, None]
    return (scores >= diagonal).sum(axis=1)  # includes the match itself


def direction_metrics(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    pool = len(ranks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"top{k}"] = float(np.mean(ranks <= k))
        out[f"chance_top{k}"] = min(k, pool) / pool
    out["median_rank"] = float(np.median(ranks))
    out["chance_median_rank"] = (pool + 1) / 2
    out["mean_rank"] = float(np.mean(ranks))
    return out


def evaluate_retrieval(fundus: np.ndarray, oct_: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    pool = len(fundus)
    if pool == 0:
        return {"pool_size": 0}
    return {
        "pool_size": pool,
        "fundus_to_oct": direction_metrics(true_match_ranks(fundus, oct_), ks),
        "oct_to_fundus": direction_metrics(true_match_ranks(oct_, fundus), ks),
    }


def top_matches(queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the k best candidates per query, best first (stable for ties)."""
    scores = np.asarray(queries, np.float64) @ np.asarray(candidates, np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)
