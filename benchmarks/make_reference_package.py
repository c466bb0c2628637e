"""A model package at the issue's reference input sizes (OCT 1x16x112x112, fundus 3x224x224), for the
end-to-end benchmark (benchmarks/embed_vs_script.py --reference).

Speed does not depend on how well a model learned, so the run is short: `retina synth` writes a small
cohort at its default file sizes, `retina train` runs one epoch at the reference input sizes (demo preset
otherwise: r3d_18 + resnet18, embedding 128), and `retina export --quantize int8` writes the package with
its int8 graphs and their accuracy gate. Each step is a fresh `retina` process and is cached under
--work (a marker per finished step), so a rerun prints the paths at once; the export is redone when the
retinacli/ or training/ sources changed since (the int8 gate is part of the export).

    python benchmarks/make_reference_package.py --work /tmp/retina-bench

Prints one JSON object: {"run": ..., "package": ..., "int8": {modality: {backend: gate passed}},
"seconds": ...}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(tempfile.gettempdir()) / "retina-bench"
# The reference sizes (benchmarks/run.py uses the same for its model-only tables).
REFERENCE = {"oct_slices": 16, "oct_size": 112, "fundus_size": 224, "embed_dim": 128}


def retina(args: list[str], log, cwd: Path | None = None, code: Path = REPO) -> str:
    """Run one `retina` command as a fresh process; its stdout, or a RuntimeError with its last words."""
    cmd = [sys.executable, "-m", "retinacli.cli", *args]
    log("$ retina " + " ".join(args))
    path = os.pathsep.join(filter(None, [str(code.resolve()), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"retina {args[0]} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout


def code_fingerprint(code: Path, *extra: bytes) -> str:
    """A short hash of the checkout's retinacli/ and training/ Python sources (plus ``extra``): cached
    results made by other code are not reused."""
    digest = hashlib.sha256()
    for path in sorted(p for part in ("retinacli", "training") for p in (code / part).rglob("*.py")):
        digest.update(str(path.relative_to(code)).encode() + b"\0" + path.read_bytes())
    for blob in extra:
        digest.update(blob)
    return digest.hexdigest()[:12]


def int8_gate(package: Path) -> dict[str, dict[str, bool | None]]:
    """Per modality and backend: did the int8 graph pass the export-time accuracy gate (None: not measured)?

    Empty for a modality without an int8 graph. Read from retina.json -> quantized.int8.encoders."""
    descriptor = json.loads((package / "retina.json").read_text())
    encoders = ((descriptor.get("quantized") or {}).get("int8") or {}).get("encoders") or {}
    out: dict[str, dict[str, bool | None]] = {}
    for modality in ("oct", "fundus"):
        gates = (encoders.get(modality) or {}).get("gate") or {}
        out[modality] = {b: None if g is None else bool(g.get("passed")) for b, g in gates.items()}
    return out


def make_reference_package(work: Path, patients: int = 8, epochs: int = 1, batch: int = 8, code: Path = REPO,
                           log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Build (or find, cached) the reference run and package under ``work/reference``."""
    folder = work / "reference"
    cohort, run, package = folder / "cohort", folder / "run", folder / "package"
    done = folder / "done.json"
    fingerprint = code_fingerprint(code)
    if done.is_file():
        made = json.loads(done.read_text())
        if made.get("code") == fingerprint:
            return made
        # Other code (e.g. a changed int8 gate): export again; the trained run stays valid.
        log(f"{package}: made by other code ({made.get('code')} != {fingerprint}), exporting again")
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    if not (cohort / ".done").is_file():
        shutil.rmtree(cohort, ignore_errors=True)
        retina(["synth", str(cohort), "--patients", str(patients), "--visits", "2", "--seed", "11"], log,
               code=code)
        (cohort / ".done").write_text("ok\n")
    if not (run / ".done").is_file():
        shutil.rmtree(run, ignore_errors=True)
        sizes = ["--oct-slices", str(REFERENCE["oct_slices"]), "--oct-size", str(REFERENCE["oct_size"]),
                 "--fundus-size", str(REFERENCE["fundus_size"]), "--embed-dim", str(REFERENCE["embed_dim"])]
        # cwd=folder: no ./train.toml or ./manifest.csv of the caller's folder is picked up.
        retina(["train", "--manifest", str(cohort / "manifest.csv"), "--out", str(run), "--preset", "demo",
                "--objective", "clip", *sizes, "--epochs", str(epochs), "--batch-size", str(batch),
                "--seed", "0"], log, cwd=folder, code=code)
        (run / ".done").write_text("ok\n")
    retina(["export", str(run), "--out", str(package), "--name", "retina-reference", "--quantize", "int8",
            "--force"], log, cwd=folder, code=code)
    result = {"run": str(run), "package": str(package), "cohort": str(cohort), "input_sizes": REFERENCE,
              "int8": int8_gate(package), "seconds": round(time.perf_counter() - start, 1),
              "code": fingerprint}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache folder (default %(default)s)")
    parser.add_argument("--patients", type=int, default=8, help="synthetic patients to train on")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose retina runs the steps")
    parser.add_argument("--rebuild", action="store_true", help="forget the cached package and export again")
    args = parser.parse_args(argv)
    if args.rebuild:
        (args.work / "reference" / "done.json").unlink(missing_ok=True)
    result = make_reference_package(args.work, args.patients, args.epochs, args.batch_size, args.code)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
