"""Index backends at scale (issue 19): recall@10 against exact search, single-query latency, build
and update time, size on disk and peak memory of the faiss and LanceDB indexes, with and without filters.

    python benchmarks/index_scale.py --sizes 100000,1000000 --dim 128 --backends faiss,lancedb \
        --work /tmp/retina-index-bench --json-out /tmp/retina-index-bench/index_scale.json

The data: unit vectors from a mixture of --clusters gaussian clusters (--noise 0.9: within-cluster cosine
~0.55, the spread of benchmarks/run.py's retrieval set; 1.5: ~0.3, overlapping clusters) whose centres
form ~sqrt(--clusters) groups (cosine ~0.5 within a group), so the data has structure at two scales and no
index's cell count lines up with it (with 1,000 well-separated clusters, IVF at 1,000 cells found every
neighbour: too easy to say much). The rows are cut into store-sized shards of 4,096 rows keyed like a
store (retinacli.vector_index.base.row_key), with filter columns: laterality OD/OS 50/50, 10,000 patients
(random pseudonyms; ~10 rows each at 10^5, ~100 at 10^6), study dates uniform over 2015-2024. The
--queries queries are fresh draws from the same mixture (a new volume, not a stored one: the harder case
for an approximate index, since no stored row is a near-duplicate).
Three query sets:
- none: no filter;
- OD+2020: laterality OD and dates 2020-01-01..2020-12-31 (~1/20 of the rows);
- patient: one patient per query (the patient of a random stored row), the rare-filter case.

Ground truth is the exact top-10 in numpy among the rows the filter keeps (retinacli.vector_index.
filters.Filter.mask: the same semantics `retrieve --search exact` uses), cached under --work. Each
backend runs in a fresh child process, one after the other (peak RSS per backend, no cross-talk),
through the backends' public API only (get_backend(name).update(...) / .open(...)): what `retina
store index` builds and `retina retrieve` searches. Measured per backend and size:
- build: update() from scratch with the rows handed over shard by shard, then the description and the
  backend's `committed` hook as `update_indexes` does, seconds;
- size on disk of the backend's folder; open() time (a `retrieve` run opens once);
- per query set: recall@10 vs exact (share of the exact top-10 found; for a patient with fewer than 10
  rows, of its rows), p50/p99 latency of single queries (one query per call, after 5 warm-up queries),
  and the largest |score - exact cosine| over the rows returned;
- update: delete one shard and add one new shard (4,096 rows), seconds, then recall@10 (no filter)
  against the exact top-10 of the updated rows, and a check that no deleted key comes back.

The machine is reported with the load average before and after each child: on a shared machine the
latencies are noisy (the recall numbers are not).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARD_ROWS = 4096  # StoreWriter's default shard size
PATIENTS = 10_000
K = 10
WARMUP = 5
DAY0 = np.datetime64("2015-01-01")
DAYS = int((np.datetime64("2025-01-01") - DAY0).astype(int))
CASES = ("none", "OD+2020", "patient")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def log(message: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# --- data --------------------------------------------------------------------------------------------------


def mixture(n: int, centres: np.ndarray, sigma: float, rng) -> np.ndarray:
    """``n`` unit vectors: a random centre plus isotropic gaussian noise, normalised."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), size=m)]
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * sigma
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def leaf_centres(clusters: int, dim: int, rng) -> np.ndarray:
    """``clusters`` unit centres in about sqrt(clusters) groups: structure at two scales (cosine ~0.5
    between centres of a group, ~0 across groups), so no index's cell count matches the data's."""
    groups = rng.standard_normal((max(1, int(np.sqrt(clusters))), dim), dtype=np.float32)
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    centres = groups[rng.integers(0, len(groups), size=clusters)]
    centres = centres + rng.standard_normal(centres.shape, dtype=np.float32) / np.sqrt(dim)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def patient_names() -> np.ndarray:
    """Pseudonym-shaped ids (like the store's `p` + hex), deterministic."""
    rng = np.random.default_rng(12345)
    return np.array([f"p{v:016x}" for v in rng.integers(0, 2**63, size=PATIENTS, dtype=np.int64)])


def columns(n: int, rng) -> dict[str, np.ndarray]:
    days = rng.integers(0, DAYS, size=n)
    dates = (DAY0 + days.astype("timedelta64[D]")).astype(str)
    return {
        "od": rng.random(n) < 0.5,  # True = OD
        "patient": rng.integers(0, PATIENTS, size=n).astype(np.int32),
        "date": np.char.replace(dates, "-", "").astype(np.int32),
    }


def keys_for(shard_numbers: np.ndarray, n: int) -> np.ndarray:
    from retinacli.vector_index.base import ROW_BITS

    rows = np.arange(n, dtype=np.int64)
    return (shard_numbers[rows // SHARD_ROWS].astype(np.int64) << ROW_BITS) | (rows % SHARD_ROWS)


def exact(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray | None, k: int = K):
    """Exact (scores, row numbers) of the k best rows among ``rows`` (None = all), best first, -1 padded."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    candidates = np.arange(len(vectors)) if rows is None else rows
    for start in range(0, len(candidates), 100_000):
        idx = candidates[start : start + 100_000]
        s = q @ np.asarray(vectors[idx], dtype=np.float32).T
        if s.shape[1] > k:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, idx = np.take_along_axis(s, part, 1), idx[part]
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(idx, s.shape)], axis=1)
        order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, order, 1), np.take_along_axis(i_all, order, 1)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


def dataset(work: Path, n: int, dim: int, clusters: int, queries: int, seed: int,
            noise: float = 0.9) -> Path:
    """Build (or reuse) the data set of ``n`` rows and its exact answers under ``work``."""
    from retinacli.vector_index.filters import Filter

    folder = work / f"data-{n}-{dim}-c{clusters}-q{queries}-s{seed}-n{noise:g}"
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log(f"data {n} x {dim}: generating")
    rng = np.random.default_rng(seed)
    centres = leaf_centres(clusters, dim, rng)
    sigma = noise / np.sqrt(dim)  # noise's length ~ `noise`, whatever the dim
    vectors = np.lib.format.open_memmap(folder / "vectors.npy", "w+", np.float32, (n, dim))
    for start in range(0, n, 200_000):
        vectors[start : start + 200_000] = mixture(min(200_000, n - start), centres, sigma, rng)
    cols = columns(n, rng)
    q = mixture(queries, centres, sigma, rng)
    q_patient = cols["patient"][rng.integers(0, n, size=queries)]
    # the update: shard 0 is deleted, one new shard appended (same mixture)
    extra = mixture(SHARD_ROWS, centres, sigma, rng)
    extra_cols = columns(SHARD_ROWS, rng)
    np.savez(folder / "meta.npz", queries=q, q_patient=q_patient, extra=extra, centres=centres,
             **cols, **{f"extra_{c}": v for c, v in extra_cols.items()})
    vectors.flush()

    log(f"data {n}: exact answers")
    names = patient_names()
    lat = np.where(cols["od"], "OD", "OS")
    od2020 = Filter(laterality="OD", date_from=20200101, date_to=20201231)
    truth: dict[str, Any] = {}
    s, i = exact(vectors, q, None)
    truth["none_s"], truth["none_i"] = s, i
    mask = od2020.mask(list(lat), list(names[cols["patient"]]), cols["date"])
    s, i = exact(vectors, q, np.flatnonzero(mask))
    truth["OD+2020_s"], truth["OD+2020_i"] = s, i
    truth["OD+2020_share"] = np.array(mask.mean())
    order = np.argsort(cols["patient"], kind="stable")
    bounds = np.searchsorted(cols["patient"][order], np.arange(PATIENTS + 1))
    ps, pi = [], []
    for j, p in enumerate(q_patient):
        s, i = exact(vectors, q[j : j + 1], np.sort(order[bounds[p] : bounds[p + 1]]))
        ps.append(s[0])
        pi.append(i[0])
    truth["patient_s"], truth["patient_i"] = np.array(ps), np.array(pi)
    # after the update: rows of shards 1.. plus the new shard (numbered n_rows, as rows n..n+SHARD_ROWS)
    both = np.concatenate([np.asarray(vectors[SHARD_ROWS:]), extra])
    s, i = exact(both, q, None)
    truth["update_none_i"] = np.where(i >= 0, i + SHARD_ROWS, -1)
    del both
    np.savez(folder / "truth.npz", **truth)
    (folder / "done").write_text("ok\n")
    return folder


def exact_latency(data: Path, queries: int = 30) -> dict[str, Any]:
    """p50 of one query by retinacli's exact block scan (the arithmetic of `retrieve --search exact`)
    over the vectors held in memory, no filter."""
    from retinacli.vector_index.evaluate import exact_top_k

    vectors = np.load(data / "vectors.npy")
    q = np.load(data / "meta.npz")["queries"][:queries]
    load = load_average()
    lat_ms = []
    for j in range(len(q)):
        t = time.perf_counter()
        exact_top_k(vectors, q[j : j + 1], K)
        lat_ms.append(1000 * (time.perf_counter() - t))
    return {"exact_single_p50_ms": round(float(np.median(lat_ms)), 2),
            "exact_single_p99_ms": round(float(np.percentile(lat_ms, 99)), 2), "load": load}


# --- one backend (child process) ------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def rows_batches(vectors, cols: dict[str, np.ndarray], shard_numbers: np.ndarray, first_row: int = 0):
    """IndexedRows per shard, as a store hands them over (vectors read shard by shard)."""
    from retinacli.vector_index.base import IndexedRows, row_key

    names = patient_names()
    n = len(vectors)
    for s, start in enumerate(range(0, n, SHARD_ROWS)):
        stop = min(n, start + SHARD_ROWS)
        yield IndexedRows(
            keys=row_key(int(shard_numbers[s]), np.arange(stop - start, dtype=np.int64)),
            vectors=np.ascontiguousarray(vectors[start:stop], dtype=np.float32),
            laterality=["OD" if v else "OS" for v in cols["od"][start:stop]],
            patient=[str(p) for p in names[cols["patient"][start:stop]]],
            date=cols["date"][start:stop].astype(np.int32),
        )


def recall(found_keys: np.ndarray, truth_rows: np.ndarray, row_of_key) -> float:
    hits, total = 0, 0
    for found, want in zip(found_keys, truth_rows, strict=True):
        want = set(int(w) for w in want if w >= 0)
        got = {row_of_key(int(k)) for k in found if k >= 0}
        hits += len(want & got)
        total += len(want)
    return hits / total if total else 1.0


def child(args) -> dict[str, Any]:
    from retinacli.vector_index import get_backend
    from retinacli.vector_index.base import ROW_BITS, IndexInfo
    from retinacli.vector_index.filters import Filter

    data = Path(args.data)
    vectors = np.load(data / "vectors.npy", mmap_mode="r")
    meta = dict(np.load(data / "meta.npz"))
    truth = dict(np.load(data / "truth.npz"))
    n, dim = vectors.shape
    shards = -(-n // SHARD_ROWS)
    shard_numbers = np.arange(shards)
    cols = {c: meta[c] for c in ("od", "patient", "date")}
    names = patient_names()
    backend = get_backend(args.child)
    folder = Path(args.index_folder)
    shutil.rmtree(folder, ignore_errors=True)
    name = "retina_bench0000000_oct"
    out: dict[str, Any] = {"backend": args.child, "vectors": int(n), "dim": int(dim),
                           "load_before": load_average()}

    def info(params, shard_list, count) -> IndexInfo:
        return IndexInfo(backend=args.child, modality="oct", model_id="bench", embed_dim=int(dim),
                         shards=[int(s) for s in shard_list], vectors=int(count),
                         built=dt.datetime.now(dt.timezone.utc).isoformat(), params=params)

    def quiet(message: str) -> None:
        log(message)  # the backends name themselves

    def commit(params, shard_list, count) -> IndexInfo:
        # as the registry's update_indexes: the description written last, then the backend's optional hook
        done = info(params, shard_list, count)
        (folder / "oct.json").write_text(json.dumps(done.to_json()))
        if hasattr(backend, "committed"):
            backend.committed(folder, done)
        return done

    t = time.perf_counter()
    params = backend.update(folder, name, None, dim=int(dim), remove_shards=[],
                            add=lambda: rows_batches(vectors, cols, shard_numbers), url=None, log=quiet)
    current = commit(params, shard_numbers, n)
    out["build_s"] = round(time.perf_counter() - t, 2)
    out["params"] = params
    out["size_mb"] = round(folder_bytes(folder) / 2**20, 1)
    t = time.perf_counter()
    searcher = backend.open(folder, current)
    out["open_s"] = round(time.perf_counter() - t, 3)

    def row_of_key(key: int) -> int:
        shard, row = key >> ROW_BITS, key & ((1 << ROW_BITS) - 1)
        return shard * SHARD_ROWS + row if shard < shards else n + row  # the update's new shard: rows n..

    q = meta["queries"]
    filters = {
        "none": [None] * len(q),
        "OD+2020": [Filter(laterality="OD", date_from=20200101, date_to=20201231)] * len(q),
        "patient": [Filter(patient=str(names[p])) for p in meta["q_patient"]],
    }
    out["cases"] = {}
    for case in CASES:
        where = filters[case]
        for j in range(WARMUP):
            searcher.search(q[j : j + 1], K, where[j])
        lat, found, scores = [], [], []
        for j in range(len(q)):
            t = time.perf_counter()
            s, k = searcher.search(q[j : j + 1], K, where[j])
            lat.append(1000 * (time.perf_counter() - t))
            found.append(np.asarray(k[0], dtype=np.int64))
            scores.append(np.asarray(s[0], dtype=np.float32))
        found_a = np.array(found)
        err = 0.0
        for qq, ks, ss in zip(q, found, scores, strict=True):
            ok = ks >= 0
            if ok.any():
                rows = np.array([row_of_key(int(k)) for k in ks[ok]])
                err = max(err, float(np.max(np.abs(np.asarray(vectors[np.sort(rows)]) @ qq
                                                    - ss[ok][np.argsort(rows)]))))
        wrong = 0
        if case != "none":  # every returned row must match the filter
            for j, ks in enumerate(found):
                rows = [row_of_key(int(k)) for k in ks if k >= 0]
                lat_ = ["OD" if cols["od"][r] else "OS" for r in rows]
                pat = list(names[cols["patient"][rows]])
                wrong += int((~where[j].mask(lat_, pat, cols["date"][rows])).sum())
        short = int(sum(int((k >= 0).sum()) < int((t_ >= 0).sum())
                        for k, t_ in zip(found, truth[f"{case}_i"], strict=True)))
        out["cases"][case] = {
            "recall_at_10": round(recall(found_a, truth[f"{case}_i"], row_of_key), 4),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "max_score_error": float(f"{err:.2e}"),
            "rows_not_matching_filter": wrong,
            "queries_with_fewer_results_than_exact": short,
        }
        log(f"{args.child} {n}: {case} {out['cases'][case]}")
    del searcher

    if not args.no_update:
        new_shard = shards  # never reused: the next number
        # as the registry does: the shards to add are deleted first too (a killed update may have added them)
        extra_cols = {c: meta[f"extra_{c}"] for c in ("od", "patient", "date")}
        t = time.perf_counter()
        params2 = backend.update(folder, name, current, dim=int(dim), remove_shards=[0, new_shard],
                                 add=lambda: rows_batches(meta["extra"], extra_cols, np.array([new_shard])),
                                 url=None, log=quiet)
        updated = commit(params2, list(range(1, shards + 1)), n)
        out["update_s"] = round(time.perf_counter() - t, 2)
        searcher = backend.open(folder, updated)
        found = np.array([np.asarray(searcher.search(q[j : j + 1], K, None)[1][0]) for j in range(len(q))])
        out["update_deleted_keys_returned"] = int(((found >= 0) & ((found >> ROW_BITS) == 0)).sum())
        # the new shard's rows are rows n.. in the truth's numbering
        out["update_recall_at_10"] = round(recall(found, truth["update_none_i"], row_of_key), 4)
        out["size_after_update_mb"] = round(folder_bytes(folder) / 2**20, 1)
        del searcher
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_after"] = load_average()
    if not args.keep_index:
        shutil.rmtree(folder, ignore_errors=True)
    return out


# --- report ---------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    lines = ["| vectors | dim | noise | backend | filter | recall@10 | p50 ms | p99 ms | build s | size MB |"
             " peak RSS MB | update s | recall after update |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dim = f"{res['dim']} | {res.get('noise', 0.9):g}"
    for size in res["sizes"]:
        entry = res["results"][str(size)]
        exact_ms = entry["exact"]["exact_single_p50_ms"]
        exact_p99 = entry["exact"]["exact_single_p99_ms"]
        lines.append(f"| {size:,} | {dim} | exact (numpy) | none | 1.0 | {exact_ms} | {exact_p99} "
                     "| | | | | |")
        for name, r in entry["backends"].items():
            if "error" in r:
                lines.append(f"| {size:,} | {dim} | {name} | | error: {r['error']} | | | | | | | |")
                continue
            for case in CASES:
                c = r["cases"][case]
                first = case == CASES[0]
                lines.append(
                    f"| {size:,} | {dim} | {name} | {case} | {c['recall_at_10']} | {c['p50_ms']} "
                    f"| {c['p99_ms']} | "
                    + (f"{r['build_s']} | {r['size_mb']} | {r['peak_rss_mb']} | {r.get('update_s', '')} | "
                       f"{r.get('update_recall_at_10', '')} |" if first else "| | | | |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated vector counts")
    parser.add_argument("--dim", type=int, default=128, help="128 = the demo package's embed_dim")
    parser.add_argument("--backends", default="faiss,lancedb")
    parser.add_argument("--clusters", type=int, default=10_000, help="leaf clusters of the mixture")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.9,
                        help="length of a row's offset from its cluster centre: 0.9 -> within-cluster "
                        "cosine ~0.55, 1.5 -> ~0.3 (clusters overlap: harder for an index)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retina-index-bench")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--markdown-out", type=Path)
    parser.add_argument("--no-update", action="store_true", help="skip the incremental-update measurement")
    parser.add_argument("--keep-index", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--index-folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    res: dict[str, Any] = {
        "when": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "dim": args.dim, "clusters": args.clusters, "noise": args.noise, "queries": args.queries, "k": K,
        "sizes": [int(s) for s in args.sizes.split(",")], "results": {},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    from importlib import metadata

    res["versions"] = {}
    for dist in ("numpy", "faiss-cpu", "lancedb", "pylance", "pyarrow"):
        try:
            res["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            res["versions"][dist] = None
    for size in res["sizes"]:
        data = dataset(args.work, size, args.dim, args.clusters, args.queries, args.seed, args.noise)
        truth = np.load(data / "truth.npz")
        entry: dict[str, Any] = {"exact": exact_latency(data),
                                 "OD+2020_share": round(float(truth["OD+2020_share"]), 4),
                                 "backends": {}}
        for name in args.backends.split(","):
            log(f"{name} at {size:,}: building (load {load_average()})")
            cmd = [sys.executable, __file__, "--child", name, "--data", str(data),
                   "--index-folder", str(args.work / f"index-{name}-{size}")]
            if args.no_update:
                cmd.append("--no-update")
            if args.keep_index:
                cmd.append("--keep-index")
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
            if proc.returncode != 0:
                entry["backends"][name] = {"error": f"child exited {proc.returncode}"}
            else:
                entry["backends"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
            log(f"{name} at {size:,}: {json.dumps(entry['backends'][name])}")
        res["results"][str(size)] = entry
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(res, indent=1) + "\n")
    table = markdown(res)
    print(table)
    if args.markdown_out:
        args.markdown_out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
