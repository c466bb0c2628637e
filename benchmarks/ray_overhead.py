"""Ray's overhead on one machine: `retina embed --ray` (a local Ray started for the run) against the local
pipeline (`retina embed`), same folder, same package, fresh store each run (issue 19: goal >= 0.8x).

Every run is a fresh process (`python -m retinacli.cli embed DATA --model PKG --store S --json [--ray]`);
per round the two alternate (local first on odd rounds, Ray first on even ones), and the table gives the
median over rounds of:

* items/s including start-up: embedded items / the process's wall time (interpreter, package load,
  discovery, and for Ray: starting Ray, the workers and the encoder actors);
* items/s excluding Ray's start-up: embedded items / the run's own seconds (the summary's `seconds`),
  minus, for Ray, the seconds `ray.init` took (the summary's `ray.start_seconds`). Worker processes
  and actors started by the job itself stay in: they are part of any Ray run;
* items/s after the first result: embedded items / (the run's seconds - the summary's
  `first_batch_seconds`): the rate once the workers and actors are up (approximate: the first batch's
  items count without their time), i.e. what a long run on a bigger folder tends to.

Data: the folders given with --data (e.g. part of benchmarks/discovery_10k.py's cache), or a synthetic
DICOM cohort written once under --work (--patients: 8 files per patient, `retina synth` default sizes).

    python benchmarks/ray_overhead.py --package /tmp/d19/demo/exported/retina-demo-clip \
        --data /tmp/retina-bench/discovery-10000/d00{0..9} --rounds 3 --json-out ray_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def synth_data(work: Path, patients: int) -> Path:
    out = work / f"cohort-{patients}"
    if not (out / "manifest.csv").is_file():
        from retinacli.synth import generate_cohort

        shutil.rmtree(out, ignore_errors=True)
        generate_cohort(out, formats=("dicom",), patients=patients, visits=2, seed=7)
    return out


def embed(data: list[Path], package: Path, store: Path, ray: bool) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    command = [sys.executable, "-m", "retinacli.cli", "embed", *map(str, data), "--model", str(package),
               "--store", str(store), "--json", *(["--ray"] if ray else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=os.environ.copy())
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    items = summary["embedded"]
    start = (summary.get("ray") or {}).get("start_seconds", 0.0) if ray else 0.0
    first = summary["first_batch_seconds"] or 0.0
    return {
        "ray": ray, "items": items, "failed": summary["failed"], "wall_s": round(wall, 3),
        "run_s": summary["seconds"], "ray_start_s": start, "first_result_s": first,
        "windows": (summary.get("ray") or {}).get("windows"),
        "with_startup": items / wall, "without_ray_startup": items / max(1e-9, summary["seconds"] - start),
        "after_first_result": items / max(1e-9, summary["seconds"] - first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--data", type=Path, nargs="+", help="folders to embed (default: a synthetic cohort)")
    parser.add_argument("--patients", type=int, default=64, help="synthetic cohort size without --data")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retina-ray-bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data or [synth_data(args.work, args.patients)]
    runs = []
    for round_ in range(args.rounds):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for ray in order:
            load = os.getloadavg()[0]
            run = embed(data, args.package, args.work / ("store-ray" if ray else "store-local"), ray)
            run.update(round=round_, load=round(load, 2))
            runs.append(run)
            print(json.dumps(run), flush=True)
    local = [r for r in runs if not r["ray"]]
    ray = [r for r in runs if r["ray"]]
    result = {"package": str(args.package), "data": [str(d) for d in data], "cores": os.cpu_count(),
              "items": local[0]["items"], "runs": runs}
    print(f"\n{local[0]['items']} items, {args.rounds} rounds, {os.cpu_count()} cores (median items/s)")
    print("| measure | local | --ray | ray / local |\n|---|---|---|---|")
    measures = (("without_ray_startup", "excluding Ray start-up"), ("with_startup", "including start-up"),
                ("after_first_result", "after the first result"))
    for key, name in measures:
        a = statistics.median(r[key] for r in local)
        b = statistics.median(r[key] for r in ray)
        result[key] = {"local": round(a, 2), "ray": round(b, 2), "ratio": round(b / a, 3)}
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    start = statistics.median(r["ray_start_s"] for r in ray)
    result["ray_start_s"] = start
    print(f"Ray start-up (ray.init, median): {start:.2f} s; goal >= 0.8x excluding it: "
          f"{'met' if result['without_ray_startup']['ratio'] >= 0.8 else 'not met'}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
