"""Measuring an index against exact search: the exact top-k by a block scan, and recall@k."""

from __future__ import annotations

import numpy as np


def exact_top_k(
    vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (scores, row numbers) of the k best rows for each query, scanning ``vectors`` (may be a
    memory map) in row blocks: one matrix product per block for all queries at once."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start in range(0, len(vectors), block):
        scores = q @ np.asarray(vectors[start : start + block], dtype=np.float32).T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        s = np.take_along_axis(scores, part, axis=1)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    return best_s, best_i


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of the exact top-k found by the approximate top-k (pads, -1, never count)."""
    k = exact_ids.shape[1]
    pairs = zip(approx_ids, exact_ids, strict=True)
    return float(np.mean([len((set(a) & set(e)) - {-1}) / k for a, e in pairs]))
