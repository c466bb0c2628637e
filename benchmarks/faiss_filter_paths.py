"""Recall@10 and single-query latency of the faiss backend's filter paths against exact numpy search.

    python benchmarks/faiss_filter_paths.py --rows 1000000 --dim 128

N clustered unit vectors (1000 gaussian clusters) of dimension D, laterality 50/50, 10,000 patients,
dates over 10 years; 100 queries per filter, each filter both through the exact path (matching rows
<= EXACT_FILTER_MAX) and through the IVF id-selector path (EXACT_FILTER_MAX forced to 0). The
filter's matching rows and its selector are built once and shared by the 100 queries, as in one
`retrieve` run. Goes through FaissBackend.update / open, as `retina store index` and `retrieve` do.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np

from retinacli.vector_index import IndexedRows
from retinacli.vector_index import faiss_index as fi
from retinacli.vector_index.base import IndexInfo, row_key
from retinacli.vector_index.filters import Filter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    n, dim = args.rows, args.dim
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, dim))
    x = centres[rng.integers(0, 1000, n)] + 0.35 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    eye = list(np.where(rng.random(n) < 0.5, "OD", "OS"))
    patient = [f"p{i:012x}" for i in rng.integers(0, 10_000, n)]
    date = (20150101 + rng.integers(0, 10, n) * 10000 + rng.integers(0, 12, n) * 100).astype(np.int32)
    rows = IndexedRows(row_key(0, np.arange(n, dtype=np.int64)), x, eye, patient, date)
    folder = pathlib.Path(tempfile.mkdtemp())
    start = time.perf_counter()
    params = fi.FaissBackend().update(folder, "bench", None, dim=dim, remove_shards=[],
                                      add=lambda: iter([rows]), url=None, log=None)
    print(f"{n} x {dim}: build {time.perf_counter() - start:.1f} s, nlist {params['nlist']}")
    searcher = fi.FaissBackend().open(folder, IndexInfo("faiss", "oct", "bench", dim, [0], n, "", params))
    queries = x[rng.integers(0, n, args.queries)] + 0.01
    filters = {
        "none": None,
        "eye (1/2)": Filter(laterality="OD"),
        "eye + 2 years (1/10)": Filter(laterality="OD", date_from=20180101, date_to=20191231),
        "eye + 1 year (1/20)": Filter(laterality="OD", date_from=20200101, date_to=20201231),
        "one patient": Filter(patient=patient[0]),
    }
    default_max = fi.EXACT_FILTER_MAX
    for name, where in filters.items():
        mask = np.ones(n, bool) if where is None else where.mask(eye, patient, date)
        sims = queries @ x[mask].T
        truth = np.flatnonzero(mask)[np.argsort(-sims, axis=1)[:, :10]]
        for exact_max in ([default_max, 0] if where is not None else [default_max]):
            fi.EXACT_FILTER_MAX = exact_max
            searcher._selected = None
            latencies, recalls = [], []
            for i, q in enumerate(queries):
                began = time.perf_counter()
                _, keys = searcher.search(q, 10, where)
                latencies.append(time.perf_counter() - began)
                recalls.append(len(set(keys[0]) & set(truth[i])) / min(10, int(mask.sum())))
            path = "exact over matches" if where is not None and mask.sum() <= exact_max else "IVF"
            p50, p99 = (np.percentile(latencies, p) * 1e3 for p in (50, 99))
            print(f"{name:22s} {int(mask.sum()):8d} rows  {path:18s} recall@10 {np.mean(recalls):.3f}  "
                  f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms")
    fi.EXACT_FILTER_MAX = default_max


if __name__ == "__main__":
    main()
