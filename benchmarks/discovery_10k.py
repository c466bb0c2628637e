"""Discovery of a 10,000-file folder against `retina embed` on it (issue 16).

The folder: 5,000 DICOM OCT volumes (OPT) + 5,000 DICOM fundus photos (OP) at `retina synth`'s default
sizes (25x224x256, 384 px), 100 files per sub-folder (50 of each). To save time they are copies of a small
synthetic cohort's files, each with a new SOPInstanceUID (renumbered in place: same length, so the file
stays valid), cached under --work. At the default sizes the folder takes ~9 GB of disk.

Measured, each in a fresh process, page cache warm (the folder was just written or read):
- discovery alone, as `retina embed` runs it: `retinacli.pipeline.discover_with_readers.stream([folder])`
  consumed (since issue 16's last part: DICOM metadata left to the reader threads), timed inside the
  process (imports excluded), median of --rounds; also `discover.scan([folder])` with every source's
  metadata (what `retina pair` uses), for reference;
- with --baseline-code DIR, the same for another checkout (e.g. `git worktree add /tmp/base HEAD~1`),
  round by round interleaved with this one, so a busy machine slows both alike;
- `retina embed FOLDER --model PKG --store STORE --json` (the default install, no speed flags), with a
  trace: this script starts the command in a process that wraps `discover.scan_iter` (time its last
  source was yielded) and `Engine.embed` (time of the first and last batch) before `retina`'s own
  `main` runs. The trace is taken externally in that sense: retina itself is unchanged.

Reported: discovery's share of the embedding time (discovery alone / embed's own seconds), and whether the
first batch reached the engine before discovery had finished (first `Engine.embed` call before the end of
`scan_iter`).

    python benchmarks/discovery_10k.py --work /tmp/retina-bench \
        --package retina-demo/exported/retina-demo-clip --json-out discovery.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_vs_script import _renumbered, code_env, log, synth_cohort

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(tempfile.gettempdir()) / "retina-bench"
PER_FOLDER = 100

DISCOVER_SCRIPT = r"""
import json, sys, time
from retinacli.pipeline import discover_with_readers
from retinacli.readers.discover import Ignored, ReadError, scan
counts = {"sources": 0, "errors": 0, "ignored": 0}
start, cpu = time.perf_counter(), time.process_time()
for found in discover_with_readers.stream([sys.argv[1]]):  # what retina embed's discovery thread runs
    kind = "errors" if isinstance(found, ReadError) else ("ignored" if isinstance(found, Ignored)
                                                     else "sources")
    counts[kind] += 1
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
start = time.perf_counter()
with_metadata = scan([sys.argv[1]])
scan_seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, **counts, "scan_seconds": scan_seconds,
                  "scan_sources": len(with_metadata.sources)}))
"""

# Runs `retina embed ...` (sys.argv[2:]) with timestamps of discovery's end and the engine's batches
# written to sys.argv[1] at exit. Patched before retina's command modules are imported, so a
# `from retinacli.readers.discover import scan_iter` inside the pipeline gets the wrapper too.
TRACE_SCRIPT = r"""
import atexit, json, sys, threading, time
T0 = time.perf_counter()
TRACE_FILE = sys.argv[1]
trace = {"discovery_end_s": None, "first_embed_s": None, "last_embed_s": None, "embed_calls": 0,
         "sources_yielded": 0, "sources_before_first_embed": None}
lock = threading.Lock()
import importlib
discover = importlib.import_module("retinacli.readers.discover")  # the package re-exports a name "discover"
from retinacli.engine import Engine
_embed = Engine.embed
def replace(original, wrapper):
    # Every loaded retinacli module that imported the function by name gets the wrapper; modules
    # imported later take it from these.
    for name, module in list(sys.modules.items()):
        if name.startswith("retinacli") and module is not None:
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, wrapper)
if hasattr(discover, "scan_iter"):  # streaming discovery (issue 16)
    _scan_iter = discover.scan_iter
    def scan_iter(paths, **options):
        for found in _scan_iter(paths, **options):
            if isinstance(found, discover.Source):
                trace["sources_yielded"] += 1
            yield found
        trace["discovery_end_s"] = round(time.perf_counter() - T0, 3)
    replace(_scan_iter, scan_iter)
else:  # older code: discovery is one call
    _scan = discover.scan
    def scan(paths):
        found = _scan(paths)
        trace["sources_yielded"] += len(found.sources)
        trace["discovery_end_s"] = round(time.perf_counter() - T0, 3)
        return found
    replace(_scan, scan)
def embed(self, *args, **kwargs):
    with lock:
        if trace["first_embed_s"] is None:
            trace["first_embed_s"] = round(time.perf_counter() - T0, 3)
            trace["sources_before_first_embed"] = trace["sources_yielded"]
        trace["embed_calls"] += 1
    out = _embed(self, *args, **kwargs)
    trace["last_embed_s"] = round(time.perf_counter() - T0, 3)
    return out
Engine.embed = embed
def write():
    trace["exit_s"] = round(time.perf_counter() - T0, 3)
    with open(TRACE_FILE, "w") as fh:
        json.dump(trace, fh)
atexit.register(write)
sys.argv = ["retina", *sys.argv[2:]]
from retinacli.cli import main
main()
"""


def make_folder(cohort: Path, folder: Path, files: int) -> Path:
    """``files`` DICOM files, half OCT and half fundus, 100 per sub-folder (cached; resumes)."""
    import pydicom

    marker = folder / f".done-{files}"
    if marker.is_file():
        return folder
    per_modality = files // 2
    for modality in ("oct", "fundus"):
        templates = sorted((cohort / "dicom").rglob(f"*_{modality}.dcm"))
        loaded = [(t.read_bytes(), str(pydicom.dcmread(t, stop_before_pixels=True).SOPInstanceUID))
                  for t in templates]
        log(f"writing {per_modality} {modality} files under {folder}")
        for k in range(per_modality):
            sub = folder / f"d{k // (PER_FOLDER // 2):03d}"
            target = sub / f"{k:05d}_{modality}.dcm"
            if target.is_file():
                continue  # resumed after an interruption
            sub.mkdir(parents=True, exist_ok=True)
            data, uid = loaded[k % len(loaded)]
            # OCT and fundus numbers must differ: fundus copies count from 10^8.
            partial = target.with_suffix(".part")
            partial.write_bytes(_renumbered(data, uid, k + (0 if modality == "oct" else 10**8)))
            partial.replace(target)
    marker.write_text("ok\n")
    return folder


def discovery_alone(folder: Path, codes: dict[str, Path], rounds: int) -> dict[str, dict]:
    """{label: result} for each checkout in `codes`, interleaved round by round."""
    runs: dict[str, list[dict]] = {label: [] for label in codes}
    for _ in range(rounds):
        for label, code in codes.items():
            # cwd = the checkout: `python -c` puts the working folder first on sys.path
            done = subprocess.run([sys.executable, "-c", DISCOVER_SCRIPT, str(folder)], capture_output=True,
                                  text=True, env=code_env(code), cwd=code)
            if done.returncode != 0:
                raise RuntimeError(f"discovery failed ({label}): {done.stderr.strip()[-600:]}")
            runs[label].append(json.loads(done.stdout))
            log(f"  discovery alone ({label}): {runs[label][-1]['seconds']:.2f} s as embed runs it, "
                f"{runs[label][-1]['scan_seconds']:.2f} s scan() with metadata, "
                f"{runs[label][-1]['sources']} sources")
    return {label: {"code": str(codes[label]),
                    "seconds": round(statistics.median(r["seconds"] for r in found), 3),
                    "seconds_rounds": [round(r["seconds"], 3) for r in found],
                    # CPU time of the process: less sensitive than wall time to other load on the machine
                    "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in found), 3),
                    "scan_seconds": round(statistics.median(r["scan_seconds"] for r in found), 3),
                    "sources": found[-1]["sources"], "errors": found[-1]["errors"],
                    "ignored": found[-1]["ignored"]}
            for label, found in runs.items()}


def embed_traced(folder: Path, package: Path, work: Path, env: dict[str, str]) -> dict:
    store, trace_file = work / "store-discovery", work / "trace.json"
    shutil.rmtree(store, ignore_errors=True)
    trace_file.unlink(missing_ok=True)
    cwd = work / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", TRACE_SCRIPT, str(trace_file), "embed", str(folder), "--model", str(package),
           "--store", str(store), "--json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"retina embed failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    trace = json.loads(trace_file.read_text())
    shutil.rmtree(store, ignore_errors=True)
    first, end = trace["first_embed_s"], trace["discovery_end_s"]
    return {"wall_s": round(wall, 2), "seconds": summary["seconds"], "embedded": summary["embedded"],
            "failed": summary["failed"], "engine": summary["engine"], "trace": trace,
            # what the command itself reports, where it does (issue 16's streaming pipeline)
            "reported": {k: summary.get(k) for k in ("discovery_seconds", "first_batch_seconds")},
            "first_batch_before_discovery_end": None if first is None or end is None else first < end}


def markdown(r: dict, command: str) -> str:
    d, half = r["discovery"], r["files"] // 2
    load = " ".join(f"{x:.2f}" for x in r["load_start"])
    lines = [f"{r['files']:,} DICOM files ({half:,} OPT 25x224x256 + {half:,} OP 384 px), {r['date']}, "
             f"{r['cores']} cores, load at start {load}.",
             "",
             f"- discovery alone, as `retina embed` runs it (fresh process, warm page cache, median of "
             f"{len(d['seconds_rounds'])}): **{d['seconds']} s** ({d['sources']:,} sources, "
             f"{1000 * d['seconds'] / max(1, r['files']):.2f} ms per file, CPU {d['cpu_seconds']} s); "
             f"`discover.scan` with every "
             f"source's metadata (`retina pair`): {d['scan_seconds']} s "
             f"({1000 * d['scan_seconds'] / max(1, r['files']):.2f} ms per file)"]
    if "baseline_discovery" in r:
        b, n = r["baseline_discovery"], max(1, r["files"])
        lines.append(f"- the same, rounds interleaved, baseline checkout {b['code']}: {b['seconds']} s "
                     f"({1000 * b['seconds'] / n:.2f} ms per file, CPU {b['cpu_seconds']} s); scan with "
                     f"metadata {b['scan_seconds']} s ({1000 * b['scan_seconds'] / n:.2f} ms per file)")
    if "embed" in r:
        e, t = r["embed"], r["embed"]["trace"]
        engines = ", ".join(f"{m} {v}" for m, v in e["engine"].items())
        before = {True: "yes", False: "no", None: "unknown (no trace)"}[e["first_batch_before_discovery_end"]]
        lines += [
            f"- `retina embed` (engine {engines}): {e['seconds']} s ({e['embedded']:,} items, {e['failed']} "
            f"failed; process wall {e['wall_s']} s)",
            f"- discovery's share of the embedding time: **{r['discovery_share']:.1%}** (goal < 10%)",
            f"- first batch reached the engine {t['first_embed_s']} s after the process started, with "
            f"{t['sources_before_first_embed']} sources found; discovery finished at "
            f"{t['discovery_end_s']} s: first batch before discovery finished: **{before}**",
        ]
    return "\n".join([*lines, "", "```console", command, "```", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache folder (default %(default)s)")
    parser.add_argument("--package", type=Path, required=True, help="model package (the demo's)")
    parser.add_argument("--files", type=int, default=10_000, help="files in the folder, half OCT half fundus")
    parser.add_argument("--rounds", type=int, default=3, help="discovery-alone repetitions")
    parser.add_argument("--no-embed", action="store_true", help="time discovery only")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose retinacli runs")
    parser.add_argument("--baseline-code", type=Path,
                        help="another checkout whose discovery is timed too, rounds interleaved")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--markdown-out", type=Path, help="the paragraph for RESULTS.md")
    args = parser.parse_args(argv)

    env = code_env(args.code)
    work = args.work.resolve()
    cohort = synth_cohort(work / "files" / "oct25x224x256-fundus384" / "synth", "25x224x256", 384, 3, env)
    folder = make_folder(cohort, work / f"discovery-{args.files}", args.files)
    load_start = os.getloadavg()
    result: dict = {"files": args.files, "folder": str(folder), "load_start": load_start,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count()}
    codes = {"this": args.code.resolve()}
    if args.baseline_code:
        codes["baseline"] = args.baseline_code.resolve()
    timed_discovery = discovery_alone(folder, codes, args.rounds)
    result["discovery"] = timed_discovery["this"]
    if "baseline" in timed_discovery:
        result["baseline_discovery"] = timed_discovery["baseline"]
    if not args.no_embed:
        log("retina embed (traced)")
        result["embed"] = e = embed_traced(folder, args.package.resolve(), work, env)
        # Share of the command's own embedding time (its summary's seconds); of the process wall too.
        result["discovery_share"] = round(result["discovery"]["seconds"] / e["seconds"], 4)
        result["discovery_share_of_wall"] = round(result["discovery"]["seconds"] / e["wall_s"], 4)
        t = e["trace"]
        log(f"embed {e['seconds']} s ({e['embedded']} items), discovery alone "
            f"{result['discovery']['seconds']} s -> share {result['discovery_share']:.1%}; first batch at "
            f"{t['first_embed_s']} s ({t['sources_before_first_embed']} sources found), discovery ended at "
            f"{t['discovery_end_s']} s")
    result["load_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    command = "python benchmarks/discovery_10k.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(result, command)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
