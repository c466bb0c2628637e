"""Cross-modal retrieval on held-out patients: fundus→OCT and OCT→fundus top-k, median rank, MRR, chance.

Row i of the fundus embeddings pairs with row i of the OCT embeddings (same eye, same visit); the
candidate pool is every held-out pair. At visit level only the query's own visit is a hit, so other
visits of the same eye are (hard) distractors; at eye level (``eye_level``, when the rows' eyes are
given) any visit of the query's eye is a hit (docs/evaluation.md, "Visit level and eye level").
"""

from __future__ import annotations

import numpy as np

from retinacli.ranking import KS, both_directions, cosine_scores, top_k_indices


def evaluate_retrieval(fundus: np.ndarray, oct_: np.ndarray, ks: tuple[int, ...] = KS, eyes=None) -> dict:
    """Both directions in the schema of :mod:`retinacli.ranking` (``{"pool_size": 0}`` when empty);
    ``eyes`` (one ``(patient_id, eye)`` per row) adds ``eye_level``."""
    return both_directions(fundus, oct_, ks, eyes=eyes)


def top_matches(queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the k best candidates per query, best first (stable for ties)."""
    scores = cosine_scores(queries, candidates)
    order = top_k_indices(scores, k)
    return order, np.take_along_axis(scores, order, axis=1)
