"""Peak host memory of `retina train` against the size of its preprocessed cache (docs/training.md).

Writes two cohorts of small files (OCT .npy 6x24x24, fundus PNG, 2 pairs per patient) with N1 and N2
pairs, then trains each (tiny preset, fundus at --fundus-size px: 0.32 MB per pair in the cache at
160 px; one epoch of batches of 8; half the patients held out for validation) in a fresh process,
and reports the cache size and the process's peak RSS (ru_maxrss). Training streams batches from
the cache, so the peak grows with the model and the batch, not with the cohort. Two things move the
peak for reasons unrelated to the cohort's size, so they are held equal: the number of optimiser
steps (the allocator's high-water mark creeps up over the first steps; the smaller cohort is trained
for as many epochs as give it the larger one's step count) and the validation batch (batches of up to
32 pairs: both cohorts need at least 64 pairs).

    python benchmarks/train_memory.py                  # 72 and 264 pairs, fundus 160 px
    python benchmarks/train_memory.py --pairs 72 520 --loader-workers 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_training_cache import write_cohort  # noqa: E402  (the cohort the memory test trains on)

RUN = """
import json, resource, sys
from training.config import resolve_config
from training.loop import train
manifest, cache, out, fundus_size, workers, epochs = sys.argv[1:7]
fundus_size = int(fundus_size)
config = resolve_config("tiny", overrides=dict(manifest=manifest, cache_dir=cache, fundus_size=fundus_size,
                        epochs=int(epochs), batch_size=8, val_fraction=0.5, augment=True, threads=2,
                        loader_workers=workers if workers == "auto" else int(workers)))
train(config, out)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def steps_per_epoch(n_pairs: int) -> int:
    """Optimiser steps of one epoch: half of the patients (2 pairs each) are held out, batches of 8."""
    patients = n_pairs // 2
    held_out = min(max(1, round(0.5 * patients)), patients - 1)  # training.data.split_patients
    return 2 * (patients - held_out) // 8


def measure(n_pairs: int, fundus_size: int, workers: str, work: Path, epochs: int = 1) -> dict:
    manifest = write_cohort(work / f"cohort_{n_pairs}", n_pairs, fundus_px=32, seed=n_pairs)
    cache = work / "cache"
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(manifest), str(cache), str(work / f"run_{n_pairs}"), str(fundus_size),
         workers, str(epochs)], capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    records = [json.loads(p.read_text()) for p in cache.glob("*/cache.json")]
    (record,) = [r for r in records if r["manifest_rows"] == n_pairs]
    return {"pairs": n_pairs, "cache_mb": round(record["bytes"] / 2**20, 1), "peak_rss_mb": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs=2, default=[72, 264])
    parser.add_argument("--fundus-size", type=int, default=160)
    parser.add_argument("--loader-workers", default="0")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="train_memory_") as tmp:
        small, large = args.pairs
        epochs = max(1, -(-steps_per_epoch(large) // steps_per_epoch(small)))  # equal step counts
        rows = [measure(small, args.fundus_size, args.loader_workers, Path(tmp), epochs),
                measure(large, args.fundus_size, args.loader_workers, Path(tmp))]
        rows[0]["epochs"], rows[1]["epochs"] = epochs, 1
        for row in rows:
            row["steps"] = row["epochs"] * steps_per_epoch(row["pairs"])
    result = {
        "fundus_size": args.fundus_size,
        "loader_workers": args.loader_workers,
        "runs": rows,
        "cache_growth_mb": round(rows[1]["cache_mb"] - rows[0]["cache_mb"], 1),
        "peak_rss_growth_mb": round(rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"], 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
