"""`retina embed` against the script a user would write instead: end-to-end marginal cost per item.

The naive script (NAIVE_SCRIPT below) is what a competent user writes without retina: a loop of
``pydicom.dcmread(path).pixel_array``, the preprocessing of benchmarks/naive_preprocess.py (a frozen copy
of retinacli/preprocess.py from before issue 16, so that speeding up the project's preprocessing counts
for retina and not for the script) and the training run's own encoder in torch eager fp32, batches of 8,
vectors kept in memory. Same files, same architecture and input shape as the package `retina embed` uses.
`retina embed` runs as the README's first command does (``retina embed FOLDER``; --model, --store and
--json only say which package, where to write and how to report; no speed flags), so it also pays for
discovery, validation, pseudonyms, the out-of-distribution check and a crash-safe store.

Marginal cost per item: every command is a fresh process, on a folder of N and one of 2N files of one
modality; per round the four runs alternate (retina N, script N, retina 2N, script 2N; reversed every
other round), and the cost is the median over rounds of (T(2N) - T(N)) / N, which removes interpreter
start-up, imports and model loading from both sides. The ratio is script / retina (> 1: retina faster).

Configurations (--configs):
  demo-synth   demo package x `retina synth` default files (OCT 25x224x256, fundus 384 px)
  demo-acq     demo package x acquisition-size files (OCT 49x496x512, fundus 1536 px)
  ref-acq      reference package (OCT 1x16x112x112, fundus 224, benchmarks/make_reference_package.py)
               x OCT 49x496x512, fundus 1536 px
  ref-acq-xl   reference package x OCT 128x1024x512, fundus 2048 px
For the reference package, when `retina embed` picks fp32 for a modality (its int8 graph failed the
accuracy gate) and an int8 graph exists, `--precision int8` is timed as well; the table says which one
users get (the default run's engine).

Everything is cached under --work: synthetic cohorts (--distinct-patients patients per file size, seed
7: 2 of 8 fundus photos grayscale NIR at 3 patients), the UID-renumbered copies that make up the N/2N
folders, the reference package, and each measured cell
(results/<config>-<modality>-<variant>-nN-rR-<hash>.json), so a rerun after an interruption measures
only what is missing. A cell's key holds a hash of the code (retinacli/, training/), the baseline and
the package descriptor: after a code change it is measured again (--fresh: always). The reference
package is re-exported when the code changed. After the timed rounds an untimed check compares
retina's stored vectors with the script's (cosine per file; --no-check skips it). Disk: ~0.5 GB
(demo-synth), ~2.5 GB (demo-acq, ref-acq share the files), ~1.9 GB (ref-acq-xl).

    python benchmarks/embed_vs_script.py --work /tmp/retina-bench \
        --demo-run retina-demo/runs/clip --demo-package retina-demo/exported/retina-demo-clip \
        --json-out e2e.json --markdown-out e2e.md
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_reference_package

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(tempfile.gettempdir()) / "retina-bench"
NAIVE_PREPROCESS = Path(__file__).resolve().parent / "naive_preprocess.py"

# name -> (package: "demo" | "reference", OCT file shape, fundus file size, default N)
# N: large enough that retina's N items take well over a second (the spread of a process start), small
# enough that a configuration takes minutes on 2 cores.
CONFIGS: dict[str, tuple[str, str, int, int]] = {
    "demo-synth": ("demo", "25x224x256", 384, 128),
    "demo-acq": ("demo", "49x496x512", 1536, 64),
    "ref-acq": ("reference", "49x496x512", 1536, 16),
    "ref-acq-xl": ("reference", "128x1024x512", 2048, 12),
}
# The goals: script / retina marginal cost, per package and modality.
GOALS = {("demo", "oct"): 3.0, ("demo", "fundus"): 2.0,
         ("reference", "oct"): 4.0, ("reference", "fundus"): 4.0}

NAIVE_SCRIPT = r"""
import importlib.util, pathlib, sys
import numpy as np, pydicom, torch
modality, folder, run_dir, naive = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
found = importlib.util.spec_from_file_location("naive_preprocess", naive)
pre = importlib.util.module_from_spec(found)
found.loader.exec_module(pre)
from training.model import load_run
run = load_run(run_dir)
encode = run.model.encode_oct if modality == "oct" else run.model.encode_fundus
prep = pre.preprocess_oct if modality == "oct" else pre.preprocess_fundus
vectors, batch = [], []
def flush():
    with torch.inference_mode():
        vectors.append(encode(torch.from_numpy(np.stack(batch))).numpy())
    batch.clear()
for path in sorted(folder.glob("*.dcm")):
    batch.append(prep(pydicom.dcmread(path).pixel_array, run.spec))
    if len(batch) == 8:
        flush()
if batch:
    flush()
if len(sys.argv) > 5:
    np.save(sys.argv[5], np.concatenate(vectors))
print(sum(len(v) for v in vectors))
"""

# Sanity check (untimed): retina's stored vectors against the script's, per file. Cosine ~1 says both
# sides ran the same weights on the same input shape (int8 and the fast preprocessing's documented
# tolerance move it slightly below 1).
CHECK_SCRIPT = r"""
import json, pathlib, sys
import numpy as np
from retinacli.store import EmbeddingStore
store = EmbeddingStore.open(sys.argv[1])
vectors = store.vectors()
names = [pathlib.PurePath(row["path"]).name for row in store.metadata(["path"])]
script = np.load(sys.argv[2])
files = sorted(p.name for p in pathlib.Path(sys.argv[3]).glob("*.dcm"))
ours = vectors[[names.index(f) for f in files]]
cos = np.sum(ours * script, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(script, axis=1))
print(json.dumps({"min_cosine": round(float(cos.min()), 6),
                  "median_cosine": round(float(np.median(cos)), 6)}))
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def code_env(code: Path) -> dict[str, str]:
    """Environment whose `retinacli`/`training` are those of the checkout ``code``."""
    path = os.pathsep.join(filter(None, [str(code.resolve()), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def timed(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        what = " ".join(cmd[:5])
        raise RuntimeError(f"{what} ... failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return seconds, done.stdout


# --- files ------------------------------------------------------------------------------------------------


def _renumbered(data: bytes, uid: str, number: int) -> bytes:
    """The file's bytes with its SOPInstanceUID's last 9 digits replaced by ``number`` (same length, so
    every element length and offset stays valid): a new instance as far as retina's identity goes."""
    head, _, last = uid.rpartition(".")
    if len(last) <= 10 or not last.isdigit():
        raise ValueError(f"cannot renumber SOPInstanceUID {uid!r} in place (last component too short)")
    new = f"{head}.{last[:-9]}{number:09d}"
    if data.count(uid.encode()) < 1:
        raise ValueError(f"SOPInstanceUID {uid!r} not found in the file's bytes")
    return data.replace(uid.encode(), new.encode())


def synth_cohort(folder: Path, oct_shape: str, fundus_size: int, patients: int, env: dict[str, str]) -> Path:
    """A `retina synth` cohort (cached): the distinct files the pools are copied from."""
    if (folder / ".done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    log(f"retina synth {folder.name}: {patients} patients, OCT {oct_shape}, fundus {fundus_size} px")
    cmd = [sys.executable, "-m", "retinacli.cli", "synth", str(folder), "--patients", str(patients),
           "--visits", "2", "--oct-shape", oct_shape, "--fundus-size", str(fundus_size), "--seed", "7"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"retina synth failed: {done.stderr.strip()[-600:]}")
    (folder / ".done").write_text("ok\n")
    return folder


def pool(cohort: Path, folder: Path, modality: str, count: int) -> list[Path]:
    """At least ``count`` DICOM files of one modality in ``folder``: the cohort's files round-robin, each
    copy with a new SOPInstanceUID (00000.dcm, 00001.dcm, ...). Grows an existing pool, never rewrites it."""
    import pydicom

    suffix = "_oct.dcm" if modality == "oct" else "_fundus.dcm"
    templates = sorted(p for p in (cohort / "dicom").rglob(f"*{suffix}"))
    if not templates:
        raise RuntimeError(f"{cohort}: no {modality} DICOM files")
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("*.dcm"))
    if len(have) < count:
        log(f"copying {count - len(have)} {modality} files into {folder}")
    wanted = range(len(have), count)
    for index, template in enumerate(templates):
        numbers = [k for k in wanted if k % len(templates) == index]
        if not numbers:
            continue
        data = template.read_bytes()
        uid = str(pydicom.dcmread(template, stop_before_pixels=True).SOPInstanceUID)
        for number in numbers:
            target = folder / f"{number:05d}.dcm"
            partial = target.with_suffix(".part")
            partial.write_bytes(_renumbered(data, uid, number))
            partial.replace(target)  # a killed copy leaves no half file the glob would count
    return sorted(folder.glob("*.dcm"))[:count]


def file_set(pooled: list[Path], folder: Path, n: int) -> Path:
    """A folder holding exactly the first ``n`` pooled files (hard links; copies across file systems)."""
    marker = folder / f".set-{n}"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in pooled[:n]:
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copyfile(path, folder / path.name)
    marker.write_text("ok\n")
    return folder


# --- measuring ---------------------------------------------------------------------------------------------


def retina_cmd(folder: Path, package: Path, store: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "retinacli.cli", "embed", str(folder), "--model", str(package),
            "--store", str(store), "--json", *extra]


def measure(
    modality: str, folders: dict[int, Path], package: Path, run: Path, extra: list[str], rounds: int,
    work: Path, env: dict[str, str], timeout: float, check: bool = True,
) -> dict[str, Any]:
    """Alternating fresh-process runs of retina and the script on the N and 2N folders."""
    n_small, n_large = sorted(folders)
    store = work / "store"
    cwd = work / "cwd"  # an empty working folder: no ./exported or ./.retina of the caller's is picked up
    cwd.mkdir(parents=True, exist_ok=True)
    script = [sys.executable, "-c", NAIVE_SCRIPT, modality]
    times: dict[tuple[str, int], list[float]] = {(w, n): [] for w in ("retina", "script") for n in folders}
    engines: set[str] = set()

    def one(who: str, n: int, keep: bool) -> None:
        if who == "retina":
            shutil.rmtree(store, ignore_errors=True)
            seconds, out = timed(retina_cmd(folders[n], package, store, extra), env, cwd, timeout)
            summary = json.loads(out[out.index("{"):])
            if summary["embedded"] != n or summary["failed"]:
                raise RuntimeError(f"retina embedded {summary['embedded']} of {n} ({summary['errors'][:2]})")
            engines.add(summary["engine"].get(modality, "?"))
        else:
            cmd = [*script, str(folders[n]), str(run), str(NAIVE_PREPROCESS)]
            seconds, out = timed(cmd, env, cwd, timeout)
            if int(out.strip().splitlines()[-1]) != n:
                raise RuntimeError(f"the script embedded {out.strip()} of {n}")
        if keep:
            times[(who, n)].append(seconds)
        log(f"  {who:6s} {modality:6s} n={n:<4d} {seconds:7.2f} s{'' if keep else ' (warm-up)'}")

    one("retina", n_large, False)  # warm-up: all files in the page cache, .pyc files written
    one("script", n_small, False)
    load_start = os.getloadavg()
    for r in range(rounds):
        order = [("retina", n_small), ("script", n_small), ("retina", n_large), ("script", n_large)]
        for who, n in order if r % 2 == 0 else order[::-1]:
            one(who, n, True)
    load_end = os.getloadavg()
    parity = None
    if check:
        shutil.rmtree(store, ignore_errors=True)
        saved = work / "script-vectors.npy"
        timed(retina_cmd(folders[n_small], package, store, extra), env, cwd, timeout)
        save = [*script, str(folders[n_small]), str(run), str(NAIVE_PREPROCESS), str(saved)]
        timed(save, env, cwd, timeout)
        _s, out = timed([sys.executable, "-c", CHECK_SCRIPT, str(store), str(saved), str(folders[n_small])],
                        env, cwd, timeout)
        parity = json.loads(out)
        log(f"  parity retina vs script: {parity}")
    shutil.rmtree(store, ignore_errors=True)
    out: dict[str, Any] = {"n": n_small, "rounds": rounds,
                           "load": [round(x, 2) for x in (*load_start, *load_end)]}
    for who in ("retina", "script"):
        small, large = times[(who, n_small)], times[(who, n_large)]
        marginal = [(b - a) / (n_large - n_small) for a, b in zip(small, large, strict=True)]
        out[who] = {"seconds_n": [round(x, 3) for x in small], "seconds_2n": [round(x, 3) for x in large],
                    "marginal_ms": round(1000 * statistics.median(marginal), 2),
                    "marginal_ms_rounds": [round(1000 * m, 2) for m in marginal],
                    # the same from the medians of T(N) and T(2N) (agrees with the above when quiet)
                    "marginal_ms_of_medians": round(
                        1000 * (statistics.median(large) - statistics.median(small)) / n_small, 2)}
    out["parity"] = parity
    out["engine"] = sorted(engines)[0] if len(engines) == 1 else sorted(engines)
    retina_ms, script_ms = out["retina"]["marginal_ms"], out["script"]["marginal_ms"]
    # A marginal cost <= 0 is noise (too small N for the load): no ratio.
    out["script_over_retina"] = round(script_ms / retina_ms, 2) if retina_ms > 0 and script_ms > 0 else None
    return out


def int8_gate(package: Path) -> dict[str, dict[str, bool | None]]:
    from make_reference_package import int8_gate as gate

    return gate(package)


def fingerprint(code: Path, package: Path) -> str:
    """Code (retinacli/, training/), baseline (script, frozen preprocessing) and package descriptor:
    a cached cell is reused only when all are unchanged."""
    from make_reference_package import code_fingerprint

    return code_fingerprint(code, NAIVE_SCRIPT.encode(), NAIVE_PREPROCESS.read_bytes(),
                            (package / "retina.json").read_bytes())


# --- report ------------------------------------------------------------------------------------------------


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"End to end, marginal cost per item ((T(2N) - T(N)) / N, median of {meta['rounds']} alternating "
        f"rounds of fresh processes), {meta['date']}, {meta['cpu']}, {meta['cores']} cores; load: 1-minute "
        f"load average before -> after each cell's timed rounds.",
        "",
        "| package (input) | files | modality | N | `retina embed` engine | retina ms/item | script ms/item "
        "| script / retina | goal | met | min cosine retina vs script | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        goal = r["goal"]
        ratio = r["script_over_retina"]
        ratio = None if ratio is None or ratio <= 0 else ratio
        cosine = (r.get("parity") or {}).get("min_cosine", "-")
        met = "n/a" if ratio is None else ("yes" if ratio >= goal else "**no**")
        engine = r["engine"] if isinstance(r["engine"], str) else "/".join(r["engine"])
        if r["variant"] != "default":
            engine += f" (`{' '.join(r['extra'])}`)"
        elif r["package_kind"] == "reference":
            engine += " (what users get)"
        lines.append(
            f"| {r['package_kind']} ({r['input']}) | {r['files']} | {r['modality']} | {r['n']} | {engine} "
            f"| {r['retina']['marginal_ms']} | {r['script']['marginal_ms']} "
            f"| {'n/a (a cost <= 0: noise)' if ratio is None else f'**{ratio}x**'} | >= {goal}x "
            f"| {met} | {cosine} | {r['load'][0]} -> {r['load'][3]} |")
    lines += ["", "```console", meta["command"], "```"]
    return "\n".join(lines) + "\n"


def input_label(package: Path, modality: str) -> str:
    spec = json.loads((package / "retina.json").read_text())["preprocessing"][modality]
    if modality == "oct":
        return f"1x{spec['slices']}x{spec['height']}x{spec['width']}"
    return f"{spec['channels']}x{spec['size']}x{spec['size']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache folder (default %(default)s)")
    parser.add_argument("--demo-run", type=Path, help="the demo's training run (the script's encoder)")
    parser.add_argument("--demo-package", type=Path, help="the package exported from --demo-run")
    parser.add_argument("--ref-run", type=Path, help="reference-size run (default: make_reference_package's)")
    parser.add_argument("--ref-package", type=Path, help="its package (default: make_reference_package's)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated, of: " + ", ".join(CONFIGS))
    parser.add_argument("--modalities", default="oct,fundus")
    parser.add_argument("--n", type=int,
                        help="items in the small folder, the large one has 2N (default per configuration: "
                             + ", ".join(f"{k} {v[3]}" for k, v in CONFIGS.items()) + ")")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default %(default)s)")
    parser.add_argument("--distinct-patients", type=int, default=3,
                        help="patients `retina synth` writes per file size; the N/2N folders are renumbered "
                             "copies of their files")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="checkout whose retinacli/training run (to compare two versions)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one command may take")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the untimed check that retina's vectors match the script's (cosine)")
    parser.add_argument("--fresh", action="store_true", help="measure again even where a result is cached")
    parser.add_argument("--json-out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--markdown-out", type=Path, help="write the table for RESULTS.md here")
    args = parser.parse_args(argv)

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)} (use {', '.join(CONFIGS)})")
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if not NAIVE_PREPROCESS.is_file():
        parser.error(f"{NAIVE_PREPROCESS} is missing (the frozen baseline preprocessing)")
    env = code_env(args.code)
    work = args.work.resolve()
    packages: dict[str, tuple[Path, Path]] = {}
    if any(CONFIGS[c][0] == "demo" for c in configs):
        if not (args.demo_run and args.demo_package):
            parser.error("the demo configurations need --demo-run and --demo-package")
        packages["demo"] = (args.demo_package.resolve(), args.demo_run.resolve())
    if any(CONFIGS[c][0] == "reference" for c in configs):
        if args.ref_package and args.ref_run:
            packages["reference"] = (args.ref_package.resolve(), args.ref_run.resolve())
        else:
            from make_reference_package import make_reference_package

            made = make_reference_package(work, code=args.code, log=log)
            packages["reference"] = (Path(made["package"]), Path(made["run"]))

    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    for name in configs:
        kind, oct_shape, fundus_size, n = CONFIGS[name]
        n = args.n or n
        package, run = packages[kind]
        files = f"OCT {oct_shape}, fundus {fundus_size} px"
        tag = f"oct{oct_shape}-fundus{fundus_size}"
        cohort = synth_cohort(work / "files" / tag / "synth", oct_shape, fundus_size,
                              args.distinct_patients, env)
        gate = int8_gate(package) if kind == "reference" else {}
        stamp = fingerprint(args.code.resolve(), package)
        for modality in modalities:
            pooled = pool(cohort, work / "files" / tag / f"pool-{modality}", modality, 2 * n)
            folders = {size: file_set(pooled, work / "files" / tag / f"{modality}-{size}", size)
                       for size in (n, 2 * n)}
            variants: list[tuple[str, list[str]]] = [("default", [])]
            for variant, extra in variants:
                key = f"{name}-{modality}-{variant}-n{n}-r{args.rounds}-{stamp}"
                cached = work / "results" / f"{key}.json"
                if cached.is_file() and not args.fresh:
                    result = json.loads(cached.read_text())
                    log(f"{key}: cached (ratio {result['script_over_retina']})")
                else:
                    log(f"{key}: measuring ({files}, package {package})")
                    try:
                        result = measure(modality, folders, package, run, extra, args.rounds, work, env,
                                         args.timeout, not args.no_check)
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                        # One broken cell does not lose the others; a rerun measures only what is missing.
                        log(f"{key}: FAILED: {exc}")
                        failures.append(f"{key}: {str(exc).splitlines()[0][:300]}")
                        continue
                    result.update({"config": name, "package_kind": kind, "package": str(package),
                                   "run": str(run), "files": files, "modality": modality, "variant": variant,
                                   "extra": extra, "input": input_label(package, modality),
                                   "goal": GOALS[(kind, modality)], "int8_gate": gate.get(modality),
                                   "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_text(json.dumps(result, indent=2) + "\n")
                    log(f"{key}: retina {result['retina']['marginal_ms']} ms/item, script "
                        f"{result['script']['marginal_ms']} ms/item -> ratio {result['script_over_retina']}")
                results.append(result)
                # Reference package, fp32 chosen by default although an int8 graph exists (its gate
                # failed): time int8 too, so both ratios are on the table.
                engine = result["engine"] if isinstance(result["engine"], str) else ""
                fp32 = engine.endswith("/fp32")
                if kind == "reference" and variant == "default" and fp32 and gate.get(modality):
                    variants.append(("int8", ["--precision", "int8"]))

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds,
        "cores": os.cpu_count(), "cpu": cpu_name(), "load_start": load_start,
        "command": "python benchmarks/embed_vs_script.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    table = markdown(results, meta)
    print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    if args.markdown_out:
        args.markdown_out.write_text(table)
    for failure in failures:
        print(f"not measured: {failure}", file=sys.stderr)
    return 1 if failures else 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
