"""Ranking maths for retrieval: ranks of the true match, top-k hit rates, exact chance levels.

The one definition used by training validation, ``retina evaluate``, the export's int8 gate, the demo
and the CLI. numpy only (``retinacli`` never imports torch).

Inputs are a score matrix ``scores`` (queries x candidates, higher is better; cosine similarity of
unit embeddings via :func:`cosine_scores`) and a boolean matrix ``relevant`` of the same shape that
marks which candidates count as a hit for each query. Paired data (row i of the queries pairs with
row i of the candidates) uses the identity (:func:`paired_relevance`); eye-level metrics mark every
candidate of the query's eye.

Rank and ties: the rank of a query is the 1-based position of its best relevant candidate, with
ties counted *against* the query: ``rank = 1 + #(irrelevant candidates scoring >= the best relevant
score)``. A constant embedding therefore ranks last, not first, and cannot look good by accident.

Result schema (:func:`rank_metrics`; one dict per query direction), the same keys everywhere:

``pool_size``           candidates each query is ranked among
``queries``             number of queries
``top{k}``              share of queries with rank <= k (for each k in ``ks``, e.g. top1, top5, top10)
``chance_top{k}``       the exact expected ``top{k}`` under a uniformly random order:
                        mean over queries of ``1 - C(pool - m, k) / C(pool, k)`` for m relevant
                        candidates (``min(k, pool) / pool`` when m = 1; 1.0 when k >= pool)
``median_rank``         median of the ranks
``mean_rank``           mean of the ranks
``chance_median_rank``  the mean rank under a random order, ``(pool + 1) / (m + 1)`` averaged over
                        queries; for one relevant candidate this is also the median, ``(pool + 1) / 2``
``mrr``                 mean reciprocal rank, mean of ``1 / rank``

Both directions of a paired set (:func:`both_directions`): ``{"pool_size": n, "fundus_to_oct": {...},
"oct_to_fundus": {...}}``. Later additions add keys; they do not rename these.

Visit level and eye level. Paired rows are visits; other visits of the same eye are near-identical,
so the visit-level figures above (the query's own visit is the only hit) are partly a coin toss
between them. When the eye of each row is known, :func:`both_directions` adds ``"eye_level"``:
``{"eyes": E, "fundus_to_oct": {...}, "oct_to_fundus": {...}}`` in the same schema, where *every*
candidate of the query's eye counts as a hit (``hit@k`` = ``top{k}``; the chance levels use each
query's number of same-eye candidates, so they are exact for pools with several visits per eye).
"""

from __future__ import annotations

from math import comb

import numpy as np

KS = (1, 5, 10)


def cosine_scores(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(Q, C) float64 dot products of the rows (cosine similarity for unit-length embeddings)."""
    return np.asarray(queries, np.float64) @ np.asarray(candidates, np.float64).T


def paired_relevance(n_queries: int, n_candidates: int | None = None) -> np.ndarray:
    """Relevance of paired data: query i's only match is candidate i."""
    return np.eye(n_queries, n_queries if n_candidates is None else n_candidates, dtype=bool)


def eye_relevance(query_eyes, candidate_eyes) -> np.ndarray:
    """(Q, C) bool: candidate j is of the same eye as query i (eyes are any hashable keys, e.g.
    ``(patient, "OD")``)."""
    codes: dict = {}
    q = np.array([codes.setdefault(e, len(codes)) for e in query_eyes], dtype=np.int64)
    c = np.array([codes.setdefault(e, len(codes)) for e in candidate_eyes], dtype=np.int64)
    return q[:, None] == c[None, :]


def _check(scores: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    relevant = np.asarray(relevant, bool)
    if scores.ndim != 2 or relevant.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must be the same 2-d shape")
    missing = np.flatnonzero(~relevant.any(axis=1))
    if missing.size:
        raise ValueError(f"{missing.size} query(ies) have no relevant candidate (first: row {missing[0]})")
    return scores, relevant


def match_ranks(scores: np.ndarray, relevant: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's best relevant candidate; ties count against the query.

    ``relevant`` defaults to :func:`paired_relevance` (square ``scores``). Raises ValueError when a
    query has no relevant candidate.
    """
    scores = np.asarray(scores, np.float64)
    if relevant is None:
        relevant = paired_relevance(*scores.shape)
    scores, relevant = _check(scores, relevant)
    if scores.shape[0] == 0:
        return np.zeros(0, int)
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
    return 1 + ((scores >= best) & ~relevant).sum(axis=1)


def chance_top_k(pool_size: int, k: int, n_relevant: int = 1) -> float:
    """Exact probability that a uniformly random order puts one of ``n_relevant`` items in the top k."""
    if pool_size < 1 or not 1 <= n_relevant <= pool_size:
        raise ValueError(f"need 1 <= n_relevant ({n_relevant}) <= pool_size ({pool_size})")
    k = min(max(int(k), 0), pool_size)
    return 1.0 - comb(pool_size - n_relevant, k) / comb(pool_size, k)


def summarize_ranks(
    ranks: np.ndarray, pool_size: int, ks: tuple[int, ...] = KS, n_relevant: np.ndarray | int = 1
) -> dict[str, float | int]:
    """The result schema (module docstring) from ranks; ``n_relevant`` per query or for all."""
    ranks = np.asarray(ranks, np.float64)
    queries = len(ranks)
    out: dict[str, float | int] = {"pool_size": int(pool_size), "queries": int(queries)}
    if queries == 0:
        return out
    m = np.broadcast_to(np.asarray(n_relevant, int), ranks.shape)
    counts = {int(c): int(n) for c, n in zip(*np.unique(m, return_counts=True), strict=True)}
    for k in ks:
        out[f"top{k}"] = float(np.mean(ranks <= k))
        out[f"chance_top{k}"] = sum(n * chance_top_k(pool_size, k, c) for c, n in counts.items()) / queries
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    out["chance_median_rank"] = float(np.mean((pool_size + 1) / (m + 1)))
    out["mrr"] = float(np.mean(1.0 / ranks))
    return out


def rank_metrics(
    scores: np.ndarray, relevant: np.ndarray | None = None, ks: tuple[int, ...] = KS
) -> dict[str, float | int]:
    """Ranks, top-k, chance and MRR of a score matrix (schema in the module docstring)."""
    scores = np.asarray(scores, np.float64)
    if relevant is None:
        relevant = paired_relevance(*scores.shape)
    ranks = match_ranks(scores, relevant)
    return summarize_ranks(ranks, scores.shape[1], ks, np.asarray(relevant, bool).sum(axis=1))


def paired_metrics(queries: np.ndarray, candidates: np.ndarray, ks: tuple[int, ...] = KS) -> dict:
    """:func:`rank_metrics` of paired embeddings (row i of ``queries`` pairs with row i of ``candidates``)."""
    return rank_metrics(cosine_scores(queries, candidates), None, ks)


def both_directions(fundus: np.ndarray, oct: np.ndarray, ks: tuple[int, ...] = KS, eyes=None) -> dict:
    """Fundus->OCT and OCT->fundus metrics of paired embeddings; ``{"pool_size": 0}`` when empty.

    ``eyes`` (one key per row, e.g. ``(patient_id, eye)``) adds the eye-level metrics (module docstring).
    """
    pool = len(fundus)
    if pool == 0:
        return {"pool_size": 0}
    scores = cosine_scores(fundus, oct)
    out = {
        "pool_size": pool,
        "fundus_to_oct": rank_metrics(scores, None, ks),
        "oct_to_fundus": rank_metrics(scores.T, None, ks),
    }
    if eyes is not None:
        eyes = list(eyes)
        if len(eyes) != pool:
            raise ValueError(f"{len(eyes)} eye keys for {pool} paired rows")
        same_eye = eye_relevance(eyes, eyes)
        out["eye_level"] = {
            "eyes": len(set(eyes)),
            "fundus_to_oct": rank_metrics(scores, same_eye, ks),
            "oct_to_fundus": rank_metrics(scores.T, same_eye, ks),
        }
    return out


def eye_key(row) -> tuple[str, str]:
    """The eye of a manifest row (or any mapping with ``patient_id`` and ``eye``)."""
    return (str(row["patient_id"]), str(row["eye"]))


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k best candidates, best first; ties keep candidate order (stable)."""
    scores = np.asarray(scores, np.float64)
    return np.argsort(-scores, axis=1, kind="stable")[:, : max(int(k), 0)]


def top_k_overlap(scores_a: np.ndarray, scores_b: np.ndarray, k: int = 5) -> float:
    """Mean share of each query's top-k (under ``scores_a``) that is also in its top-k under ``scores_b``.

    1.0 when there are no queries or no candidates; k is capped at the number of candidates. Ties
    are broken by candidate order in both rankings (:func:`top_k_indices`).
    """
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"score matrices differ in shape: {scores_a.shape} vs {scores_b.shape}")
    k = min(int(k), scores_a.shape[1]) if scores_a.ndim == 2 else 0
    if k <= 0 or len(scores_a) == 0:
        return 1.0
    a, b = top_k_indices(scores_a, k), top_k_indices(scores_b, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))
