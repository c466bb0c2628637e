"""`retina embed` against the script a user would write instead, whole commands side by side.

The script (NAIVE_SCRIPT below): a loop of ``pydicom.dcmread(path).pixel_array``, the package's own
``retinacli.preprocess.preprocess_oct`` and the trained run's OCT encoder in torch eager fp32, batches
of 8, vectors kept in memory. `retina embed` does more (discovery, validation, pseudonyms, redacted
paths, a crash-safe store), so the ratio is what that costs or saves end to end. Both run as fresh
processes over the same synthetic DICOM OCT folder, alternating, median of --rounds.

    python benchmarks/embed_vs_script.py --run retina-demo/runs/clip \
        --package retina-demo/exported/retina-demo-clip --volumes 96 --rounds 3
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

NAIVE_SCRIPT = r"""
import sys, pathlib, numpy as np, pydicom, torch
from retinacli.preprocess import preprocess_oct
from training.model import load_run
run = load_run(sys.argv[2])
files = sorted(p for p in pathlib.Path(sys.argv[1]).rglob("*oct*.dcm"))
vectors, batch = [], []
def flush():
    with torch.inference_mode():
        vectors.append(run.model.encode_oct(torch.from_numpy(np.stack(batch))).numpy())
    batch.clear()
for path in files:
    batch.append(preprocess_oct(pydicom.dcmread(path).pixel_array, run.spec))
    if len(batch) == 8:
        flush()
if batch:
    flush()
print(sum(len(v) for v in vectors))
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="training run (torch baseline)")
    parser.add_argument("--package", type=Path, required=True, help="its exported package")
    parser.add_argument("--volumes", type=int, default=96, help="about this many OCT volumes")
    parser.add_argument("--oct-shape", default="8x64x64", help="synthetic volume size (B-scans x H x W)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retina-embed-vs-script")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="checkout whose retinacli/training run (to compare two versions)")
    parser.add_argument("--store-flag", default="--store", help="the store option's name (0.1.0: --out)")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(args.code.resolve())}
    cohort = args.work / f"cohort-{args.volumes}-{args.oct_shape}"
    if not cohort.is_dir():
        patients = max(1, round(args.volumes / 3))  # ~1.5 eyes per patient, 2 visits
        synth = ["synth", str(cohort), "--patients", str(patients), "--visits", "2",
                 "--oct-shape", args.oct_shape, "--fundus-size", "32", "--seed", "7"]
        subprocess.run([sys.executable, "-m", "retinacli.cli", *synth], check=True, capture_output=True,
                       env=env, cwd=REPO)
    oct_dir = cohort / "dicom"
    store = args.work / "store"
    retina_s, script_s, items = [], [], None
    for _ in range(args.rounds):
        shutil.rmtree(store, ignore_errors=True)
        embed = ["embed", str(oct_dir), "--modality", "oct", "--model", str(args.package),
                 args.store_flag, str(store), "--json"]
        seconds, out = timed([sys.executable, "-m", "retinacli.cli", *embed], env)
        retina_s.append(seconds)
        items = json.loads(out)["embedded"]
        seconds, out = timed([sys.executable, "-c", NAIVE_SCRIPT, str(oct_dir), str(args.run)], env)
        script_s.append(seconds)
        assert int(out.strip()) == items, (out, items)
    retina, script = statistics.median(retina_s), statistics.median(script_s)
    print(json.dumps({
        "volumes": items, "oct_shape": args.oct_shape, "rounds": args.rounds,
        "retina_embed_s": round(retina, 2), "script_s": round(script, 2),
        "retina_ms_per_volume": round(1000 * retina / items, 1),
        "script_ms_per_volume": round(1000 * script / items, 1),
        "script_over_retina": round(script / retina, 3), "code": str(args.code),
        "load": os.getloadavg(),
    }, indent=2))


if __name__ == "__main__":
    main()
