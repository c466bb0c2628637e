"""Issue 21's learning goals over training seeds: `retina demo` per seed, then `retina evaluate` on it.

For each seed: `retina demo --seed S` (the whole demo, timed as a user runs it), whose summary holds
fundus->OCT / OCT->fundus retrieval at visit and eye level through the exported packages, on the
held-out patients and on the unseen cohort (a fresh `retina synth` cohort, seed S + 1000); then
`retina evaluate --runs runs/clip runs/cloob --baseline random --modes probe` on the demo's cohort
(5-fold patient-grouped linear probe of pre-trained vs random-init encoders, and the modality swap).

Prints a markdown table (mean over seeds, with min-max) and writes every number to --out/learning.json.

    python benchmarks/learning.py --work /tmp/retina-learning --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RETINA = [sys.executable, "-m", "retinacli.cli"]
TASK_METRIC = {"cst": ("mae", "lower"), "bcva": ("auroc", "higher"), "tn": ("auroc", "higher")}


def run(args: list[str], cwd: Path | None = None) -> dict:
    result = subprocess.run(RETINA + args + ["--json"], capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"retina {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def retrieval_numbers(r: dict) -> dict:
    """The goal figures of one retrieval result: visit-level top-1, eye-level hit@5 (fundus->OCT), ratios."""
    visit, eye = r["fundus_to_oct"], r["eye_level"]["fundus_to_oct"]
    back = r["eye_level"]["oct_to_fundus"]
    return {
        "pool": r["pool_size"], "eyes": r["eye_level"]["eyes"],
        "visit_top1": visit["top1"], "visit_chance_top1": visit["chance_top1"],
        "visit_top1_x_chance": visit["top1"] / visit["chance_top1"],
        "eye_hit1": eye["top1"], "eye_hit5": eye["top5"], "eye_hit10": eye["top10"],
        "eye_chance_hit5": eye["chance_top5"], "eye_hit5_x_chance": eye["top5"] / eye["chance_top5"],
        "eye_mrr": eye["mrr"], "o2f_eye_hit5": back["top5"], "o2f_visit_top1": r["oct_to_fundus"]["top1"],
    }


def probe_numbers(results: dict) -> dict:
    """OCT probe of each source per task (mean, fold sd) and the modality swap on CST."""
    out: dict = {}
    for source, cv in results["cv"].items():
        probe = cv.get("probe") or {}
        entry: dict = {}
        for task, (metric, _) in TASK_METRIC.items():
            for key in ("oct", "fundus", "oct_to_fundus", "fundus_to_oct"):
                summary = ((probe.get(key) or {}).get(task) or {}).get("summary", {}).get(metric)
                if summary:
                    entry[f"{key}_{task}_{metric}"] = summary["mean"]
                    entry[f"{key}_{task}_{metric}_sd"] = summary["sd"]
        out[source] = entry
    return out


def seed_run(work: Path, seed: int) -> dict:
    folder = work / f"seed{seed}"
    started = time.perf_counter()
    demo = run(["demo", "--workdir", str(folder), "--seed", str(seed)])
    seconds = time.perf_counter() - started
    evaluation = run(["evaluate", "--manifest", "manifest.csv", "--runs", "runs/clip", "runs/cloob",
                      "--baseline", "random", "--modes", "probe", "--no-figures", "--out", "evaluation"],
                     cwd=folder)
    results = json.loads((folder / "evaluation" / "results.json").read_text()) if "cv" not in evaluation \
        else evaluation
    return {
        "seed": seed, "demo_seconds": round(seconds, 1), "demo_stages": demo["seconds"],
        "objectives": {
            o: {"held_out": retrieval_numbers(r["retrieval"]),
                "unseen": retrieval_numbers(r["unseen_retrieval"])}
            for o, r in demo["objectives"].items()
        },
        "probe": probe_numbers(results),
    }


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def table(runs: list[dict]) -> str:
    lines = ["| objective | set | visit top-1 (x chance) | eye hit@5 (x chance) | eye hit@1 | eye MRR "
             "| pool |",
             "|---|---|---|---|---|---|---|"]
    for objective in runs[0]["objectives"]:
        for split in ("held_out", "unseen"):
            rows = [r["objectives"][objective][split] for r in runs]
            lines.append(
                f"| {objective.upper()} | {split.replace('_', '-')} | "
                f"{spread([x['visit_top1'] for x in rows])} "
                f"({spread([x['visit_top1_x_chance'] for x in rows])}x) | "
                f"{spread([x['eye_hit5'] for x in rows])} "
                f"({spread([x['eye_hit5_x_chance'] for x in rows])}x) | "
                f"{spread([x['eye_hit1'] for x in rows])} | {spread([x['eye_mrr'] for x in rows])} | "
                f"{spread([x['pool'] for x in rows])} |"
            )
    lines += ["", "| source | CST MAE µm (fold sd) | BCVA AUROC (fold sd) | TN AUROC (fold sd) | "
              "CST MAE: OCT head on fundus | CST MAE: fundus head on OCT |", "|---|---|---|---|---|---|"]
    for source in runs[0]["probe"]:
        p = [r["probe"][source] for r in runs]

        def cell(key: str, p=p) -> str:
            values = [x[key] for x in p if x.get(key) is not None]
            sds = [x[key + "_sd"] for x in p if x.get(key + "_sd") is not None]
            if not values:
                return "—"
            return spread(values) + (f" (sd {statistics.mean(sds):.2g})" if sds else "")

        lines.append(f"| {source} | {cell('oct_cst_mae')} | {cell('oct_bcva_auroc')} | "
                     f"{cell('oct_tn_auroc')} | "
                     f"{cell('oct_to_fundus_cst_mae')} | {cell('fundus_to_oct_cst_mae')} |")
    lines += ["", "demo wall time s: " + spread([r["demo_seconds"] for r in runs])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the demo runs (one per seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        runs.append(seed_run(args.work, seed))
        print(f"seed {seed}: demo {runs[-1]['demo_seconds']} s", file=sys.stderr, flush=True)
        (args.work / "learning.json").write_text(json.dumps(runs, indent=2) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
