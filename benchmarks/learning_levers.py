"""One lever of the demo preset, measured: train on a cohort, then retrieval on held-out and unseen patients.

Trains `--preset demo` with `--set key=value` overrides (any TrainConfig key) on `--manifest`, then
embeds with the trained torch encoders and prints fundus->OCT retrieval at visit level (top-1 vs
chance) and eye level (hit@5 vs chance, hit@1, MRR) on the run's held-out patients and on each
`--unseen` cohort manifest (fresh `retina synth` cohorts with other seeds). Appends every number to
`--work/levers.jsonl`. The cohorts of docs/training.md ("Levers tried"):

    retina synth A120 --patients 120 --visits 2 --seed 0 --oct-shape 12x128x160 --fundus-size 160
    retina synth A240 --patients 240 --visits 2 --seed 0 --oct-shape 12x128x160 --fundus-size 160
    retina synth B --patients 24 --visits 3 --seed 1001 --oct-shape 12x128x160 --fundus-size 160
    retina synth C --patients 24 --seed 1002                 # retina synth's default sizes
    python benchmarks/learning_levers.py base --manifest A120/manifest.csv --unseen B/manifest.csv \
        C/manifest.csv --set objective=clip
    python benchmarks/learning_levers.py cloob-from-clip --manifest A240/manifest.csv \
        --unseen B/manifest.csv C/manifest.csv --set objective=cloob epochs=2 lr=1e-4 init_from=WORK/runs/p240
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from retinacli.cohort_manifest import read_cohort_manifest
from retinacli.ranking import both_directions, eye_key
from training.config import resolve_config
from training.data import load_pairs
from training.loop import train
from training.model import load_run


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def line(name: str, cohort: str, r: dict) -> str:
    visit, eye = r["fundus_to_oct"], r["eye_level"]["fundus_to_oct"]
    return (f"{name:24s} {cohort:10s} visit top-1 {visit['top1']:.3f} "
            f"({visit['top1'] / visit['chance_top1']:.1f}x chance)  eye hit@5 {eye['top5']:.3f} "
            f"({eye['top5'] / eye['chance_top5']:.2f}x)  eye hit@1 {eye['top1']:.3f}  "
            f"MRR {eye['mrr']:.3f}  pool {r['pool_size']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the run's name (WORK/runs/NAME)")
    parser.add_argument("--manifest", type=Path, required=True, help="training cohort manifest")
    parser.add_argument("--unseen", type=Path, nargs="*", default=[], help="unseen cohort manifests")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides")
    parser.add_argument("--work", type=Path, default=Path("/tmp/retina-levers"))
    args = parser.parse_args()
    overrides = {"manifest": str(args.manifest)}
    overrides.update({k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    run = args.work / "runs" / args.name
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    train(resolve_config("demo", overrides=overrides), run)
    seconds = time.perf_counter() - started
    loaded = load_run(run)
    record = {"name": args.name, "overrides": overrides, "train_seconds": round(seconds, 1), "results": {}}
    val = set(json.loads((run / "split.json").read_text())["val"])
    for manifest in [args.manifest, *args.unseen]:
        rows = read_cohort_manifest(manifest)
        if manifest == args.manifest:
            rows = [r for r in rows if r["patient_id"] in val]
        pairs = load_pairs(rows, loaded.spec)
        f = loaded.model.encode("fundus", pairs.fundus, 32)
        o = loaded.model.encode("oct", pairs.oct, 32)
        r = both_directions(f, o, eyes=[eye_key(x) for x in pairs.rows])
        label = "held-out" if manifest == args.manifest else manifest.parent.name
        record["results"][label] = r
        print(line(args.name, label, r), flush=True)
    print(f"{args.name}: trained in {seconds:.0f} s", flush=True)
    with open(args.work / "levers.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
