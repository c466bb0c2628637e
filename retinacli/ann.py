"""The IVF helpers under their earlier names, for benchmarks/run.py (its ANN sweep).

The store's indexes are retinacli.vector_index (faiss, LanceDB, Qdrant backends); this module only
re-exports the faiss building blocks and the exact-search measures.
"""

from __future__ import annotations

from retinacli.vector_index import AUTO_MIN_ROWS, installed
from retinacli.vector_index.evaluate import exact_top_k, recall_at_k
from retinacli.vector_index.faiss_index import DEFAULT_NPROBE, add, build_ivf, nlist_for, search_index

__all__ = ["AUTO_MIN_ROWS", "DEFAULT_NPROBE", "add", "build_ivf", "exact_top_k", "faiss_available",
           "nlist_for", "recall_at_k", "search_index"]


def faiss_available() -> bool:
    return installed("faiss")
