"""Which LanceDB vector index the lancedb backend uses, and from what size (retinacli/vector_index/
lancedb_index.py: INDEX_TYPE, MIN_INDEX_ROWS, DEFAULT_NPROBES).

For clustered synthetic unit vectors (dot product = cosine), per index type: build time, size on
disk, recall@10 against exact numpy search, p50 / p99 single-query latency, the largest error of the
reported scores against the exact cosines; and the latency of LanceDB's brute-force scan (no index).

    python benchmarks/lancedb_index_types.py --rows 20000 100000 --dim 128 --json-out /tmp/lance_types.json

Numbers from a shared machine are noisy: run the sizes interleaved, and compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("LANCEDB_LOG", "error")


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(10, n // 100), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), size=n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(n: int, dim: int, types: list[str], queries: int, nprobes: int, work: Path) -> list[dict]:
    import lancedb
    import pyarrow as pa
    from lancedb.index import HnswSq, IvfFlat, IvfPq, IvfSq

    configs = {"IVF_FLAT": (IvfFlat, {}), "IVF_PQ": (IvfPq, {"refine_factor": 10}),
               "IVF_SQ": (IvfSq, {"refine_factor": 4}), "IVF_HNSW_SQ": (HnswSq, {"refine_factor": 4})}
    vectors = clustered(n, dim, seed=0)
    rng = np.random.default_rng(1)
    q = vectors[rng.choice(n, queries, replace=False)] + 0.05 * rng.normal(size=(queries, dim))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    exact = np.argsort(-(q @ vectors.T), axis=1)[:, :10]
    data = pa.table({"key": np.arange(n, dtype=np.int64),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)})
    out = []
    for kind in ["none", *types]:
        shutil.rmtree(work, ignore_errors=True)
        table = lancedb.connect(str(work)).create_table("t", data)
        start = time.perf_counter()
        extra: dict = {}
        if kind != "none":
            cls, extra = configs[kind]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table.create_index("vector", config=cls(distance_type="dot"))
        build_s = time.perf_counter() - start
        latencies, recalls, errors = [], [], []
        for i in range(queries):
            query = table.search(q[i]).distance_type("dot").limit(10).select(["key", "_distance"])
            if kind != "none":
                query = query.nprobes(nprobes)
                if "refine_factor" in extra:
                    query = query.refine_factor(extra["refine_factor"])
            start = time.perf_counter()
            result = query.to_arrow()
            latencies.append(time.perf_counter() - start)
            keys = result.column("key").to_numpy()
            recalls.append(len(set(keys) & set(exact[i])) / 10)
            errors.append(np.abs((1 - result.column("_distance").to_numpy()) - vectors[keys] @ q[i]).max())
        row = {"rows": n, "dim": dim, "index": kind, "nprobes": nprobes if kind != "none" else None,
               "build_s": round(build_s, 2), "disk_mb": round(folder_bytes(work) / 1e6, 1),
               "recall_at_10": round(float(np.mean(recalls)), 4),
               "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
               "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
               "max_score_error": float(np.max(errors)), **extra}
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--types", nargs="+", default=["IVF_FLAT", "IVF_PQ", "IVF_SQ"],
                        help="IVF_FLAT IVF_PQ IVF_SQ IVF_HNSW_SQ (HNSW trains slowly: minutes at 1e5)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--nprobes", type=int, default=20)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lance-types-"))
    try:
        results = [r for n in args.rows for r in run(n, args.dim, args.types, args.queries, args.nprobes,
                                                        work / "db")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
