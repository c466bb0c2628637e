"""CPU inference benchmark of retina: encoders per engine/precision, end-to-end `retina embed`, peak
memory while streaming, retrieval latency/recall at scale, and the machine's arithmetic floor.

    .venv/bin/python benchmarks/run.py --package PKG --out benchmarks/RESULTS.md          # ~15 min
    .venv/bin/python benchmarks/run.py --package PKG --out benchmarks/RESULTS.md --quick  # ~4 min

Everything runs in one process on one machine: engines are timed round-robin (one batch of each in
turn, repeated), so load from other processes hits them alike, and the headline numbers are ratios
to torch eager fp32 from the same rounds. The load average is recorded with every section. Raw
numbers go to ``--json`` (default: next to ``--out``); the Markdown sections between the
``perf`` markers of ``--out`` are replaced, the rest of the file (e.g. "Training throughput") is kept.

Needs the training extras (torch) for the torch baseline and the reference-size export;
OpenVINO and faiss are measured when installed (``retina[openvino]``, ``retina[faiss]``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BEGIN, END = "<!-- perf:begin (benchmarks/run.py writes this part) -->", "<!-- perf:end -->"
REFERENCE = {"oct_slices": 16, "oct_size": 112, "fundus_size": 224, "embed_dim": 128}


# --- machine ------------------------------------------------------------------------------------------


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lscpu.splitlines()) if v
    )
    info["cpu"] = fields.get("Model name", platform.processor())
    info["cores"] = int(fields.get("Core(s) per socket", "0") or 0) * int(fields.get("Socket(s)", "1") or 1)
    info["threads_per_core"] = fields.get("Thread(s) per core")
    info["logical_cpus"] = os.cpu_count()
    flags = set(fields.get("Flags", "").split())
    wanted = re.compile(r"(avx512(f|_vnni|_bf16|_fp16|bw|vl)|avx_vnni|amx\w*|avx2|fma)$")
    info["flags"] = sorted(f for f in flags if wanted.match(f))
    versions = {}
    for dist in ("retina", "numpy", "torch", "onnxruntime", "openvino", "faiss-cpu", "onnx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    return info


def median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 2)


# --- arithmetic floor ------------------------------------------------------------------------------------


def gemm_floor(threads: int, quick: bool) -> dict[str, Any]:
    """Measured peak of this CPU: fp32 GEMM (torch/MKL-DNN and numpy BLAS) and int8 GEMM (torch._int_mm)."""
    import torch

    torch.set_num_threads(threads)
    n = 1536 if quick else 2048
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    b8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    na, nb = a32.numpy(), b32.numpy()
    ops = {
        "torch sgemm": lambda: a32 @ b32,
        "numpy sgemm": lambda: na @ nb,
        "torch int8 gemm": lambda: torch._int_mm(a8, b8),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for fn in ops.values():
        fn()
    for _ in range(3 if quick else 5):
        for name, fn in ops.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    flop = 2 * n**3
    return {"n": n, "threads": threads, "load": load_average(),
            "gflops": {k: round(flop / min(v) / 1e9, 1) for k, v in times.items()}}


# --- encoders --------------------------------------------------------------------------------------------


def model_flops(model, modality: str, shape: tuple[int, ...]) -> float:
    """FLOPs of one item's forward pass (torch's flop counter: 2 x multiply-adds)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, *shape))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_oct(x) if modality == "oct" else model.encode_fundus(x)
    return float(counter.get_total_flops())


def reference_package(work: Path, log) -> tuple[Path, Any]:
    """A package of randomly initialised encoders at the issue's reference sizes (OCT 16x112x112,
    fundus 224^2), with fp32 and int8 graphs (speed does not depend on the weights)."""
    import torch

    from retinacli.preprocess import make_spec
    from training.config import resolve_config
    from training.export import ENCODER_FILES, INT8_FILES, export_encoder, quantize_encoder
    from training.model import build_model

    config = resolve_config("demo", overrides={**REFERENCE, "fundus_init": "random", "oct_init": "random"})
    torch.manual_seed(0)
    model = build_model(config).float().eval()
    spec = make_spec(REFERENCE["oct_slices"], REFERENCE["oct_size"], REFERENCE["fundus_size"], 3)
    folder = work / "reference"
    shapes = {"oct": (1, 16, 112, 112), "fundus": (3, 224, 224)}
    marker = folder / "done.json"
    if not marker.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for modality, shape in shapes.items():
            log(f"exporting the reference {modality} encoder {shape}")
            calib = rng.normal(size=(8, *shape)).astype(np.float32)
            export_encoder(model, modality, calib[:2], folder / ENCODER_FILES[modality], 18, "dynamo")
            quantize_encoder(folder / ENCODER_FILES[modality], folder / INT8_FILES[modality], modality, calib)
        marker.write_text(json.dumps({"spec": spec}))
    return folder, model


# Pause before each timed call: worker threads of the engine timed just before (torch's OpenMP
# pool) may still busy-wait, and that CPU time would be charged to the next engine.
SETTLE_S = 0.1


def _inputs_for(modality: str, shape, batch: int, cohort: dict[str, np.ndarray] | None) -> np.ndarray:
    if cohort is not None and len(cohort[modality]) >= batch:
        return np.ascontiguousarray(cohort[modality][:batch])
    return np.random.default_rng(1).normal(size=(batch, *shape)).astype(np.float32)


def time_encoders(
    label: str, folder: Path, model, shapes: dict[str, tuple[int, ...]], batch: int, rounds: int,
    threads: int, cohort: dict[str, np.ndarray] | None, log,
) -> dict[str, Any]:
    """Round-robin timing of torch eager fp32 and every installed engine x precision on the same batch."""
    import torch

    from retinacli.backends import OnnxRuntimeRunner, OpenVinoRunner, backend_installed
    from training.export import ENCODER_FILES, INT8_FILES

    torch.set_num_threads(threads)
    results: dict[str, Any] = {}
    for modality, shape in shapes.items():
        x = _inputs_for(modality, shape, batch, cohort)
        encode = model.encode_oct if modality == "oct" else model.encode_fundus

        def torch_eager(a, encode=encode):
            with torch.inference_mode():
                return encode(torch.from_numpy(a)).numpy()

        runners = {"torch eager fp32": torch_eager}
        for precision, files in (("fp32", ENCODER_FILES), ("int8", INT8_FILES)):
            path = folder / files[modality]
            if not path.is_file():
                continue
            blob = path.read_bytes()
            runners[f"onnxruntime {precision}"] = OnnxRuntimeRunner(
                blob, modality, "embedding", threads, ["CPUExecutionProvider"]).run
            if backend_installed("openvino"):
                runners[f"openvino {precision}"] = OpenVinoRunner(blob, modality, "embedding", threads).run
        reference = torch_eager(x)
        cosine = {}
        for name, run in runners.items():
            got = run(x)  # also the warm-up
            cosine[name] = round(float(np.min(np.sum(got.astype(np.float64) * reference, axis=1))), 6)
        samples: dict[str, list[float]] = {name: [] for name in runners}
        load_before = load_average()
        for _ in range(rounds):
            for name, run in runners.items():
                time.sleep(SETTLE_S)
                t = time.perf_counter()
                run(x)
                samples[name].append((time.perf_counter() - t) / batch)
        per_item = {name: median_ms(s) for name, s in samples.items()}
        base = per_item["torch eager fp32"]
        results[modality] = {
            "input": list(shape), "batch": batch, "rounds": rounds, "threads": threads,
            "ms_per_item": per_item,
            "speedup_vs_torch": {k: round(base / v, 2) for k, v in per_item.items()},
            "min_cosine_to_torch_fp32": cosine,
            "gflop_per_item": round(model_flops(model, modality, shape) / 1e9, 2),
            "load": f"{load_before} -> {load_average()}",
        }
        log(f"{label} {modality}: " + ", ".join(f"{k} {v} ms" for k, v in per_item.items()))
    return results


# --- end-to-end embed and memory -------------------------------------------------------------------------


def make_volumes(folder: Path, n_volumes: int, oct_shape: tuple[int, int, int], log) -> Path:
    """A DICOM cohort with about ``n_volumes`` OCT volumes (synthetic, retina synth)."""
    from retinacli.synth import generate_cohort

    marker = folder / f"done-{n_volumes}-{'x'.join(map(str, oct_shape))}"
    if marker.is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    log(f"writing ~{n_volumes} synthetic DICOM OCT volumes {oct_shape} to {folder}")
    patients = max(1, round(n_volumes / (2 * 1.5)))  # ~1.5 eyes per patient, 2 visits
    generate_cohort(folder, patients=patients, visits=2, seed=7, oct_shape=oct_shape, fundus_size=32,
                    formats=("dicom",))
    marker.write_text("ok\n")
    return folder


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def peak_rss_mb(package: Path, inputs: Path, store: Path, extra: list[str]) -> tuple[float, dict[str, Any]]:
    """Peak resident memory (MiB) of one `retina embed` process.

    Read from the child's own VmHWM (polled every 50 ms; it only grows), not from wait4's
    ru_maxrss: Linux carries the forking parent's RSS over exec into ru_maxrss, so a child of
    this (large) benchmark process would report the benchmark's memory.
    """
    if store.exists():
        shutil.rmtree(store)
    cmd = [sys.executable, "-m", "retinacli.cli", "embed", str(inputs), "--model", str(package), "--out",
           str(store), "--modality", "oct", "--json", *extra]
    peak = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO)
        while proc.poll() is None:
            peak = max(peak, _vm_hwm_kib(proc.pid) or 0)
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        text = out.read()
        if proc.returncode != 0:
            raise RuntimeError(f"retina embed failed ({proc.returncode}): {err.read().strip()[-300:]}")
    return round(peak / 1024, 1), json.loads(text[text.index("{"):])


def model_only(
    package: Path, inputs: Path, batch: int, backend: str, precision: str, rounds: int
) -> dict[str, Any]:
    """The same volumes, read and preprocessed beforehand, through Engine.embed only."""
    from retinacli.engine import Engine
    from retinacli.readers import iter_items

    engine = Engine.load(package, backend=backend, precision=precision)
    arrays = [engine.preprocess(item) for item in iter_items([inputs], modality="oct")
              if not isinstance(item, Exception)]
    x = np.stack(arrays)
    engine.embed("oct", x[:batch])  # warm-up: sessions built
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for start in range(0, len(x), batch):
            engine.embed("oct", x[start : start + batch])
        times.append(time.perf_counter() - t)
    return {"items": len(x), "items_per_second": round(len(x) / statistics.median(times), 2),
            "engine": engine.variant("oct").label}


def end_to_end(package: Path, work: Path, n: int, batch: int, rounds: int, log) -> dict[str, Any]:
    spec = json.loads((package / "retina.json").read_text())["preprocessing"]["oct"]
    folder = make_volumes(work / f"e2e-{n}", n, (spec["slices"], spec["height"], spec["width"]), log)
    shape = [spec["slices"], spec["height"], spec["width"]]
    result: dict[str, Any] = {"volumes_shape": shape, "batch": batch}
    load_before = load_average()
    e2e_runs, model_runs = [], []
    for _ in range(rounds):  # interleaved: e2e, model-only, e2e, ...
        _rss, summary = peak_rss_mb(package, folder, work / "store-e2e", ["--batch-size", str(batch)])
        e2e_runs.append(summary["items_per_second"])
        engine = summary["engine"]["oct"]
        backend, precision = engine.split("/")
        model_runs.append(model_only(package, folder, batch, backend, precision, 1)["items_per_second"])
    result.update({
        "items": summary["embedded"], "engine": engine,
        "embed_items_per_second": statistics.median(e2e_runs),
        "model_only_items_per_second": statistics.median(model_runs),
        "load": f"{load_before} -> {load_average()}",
    })
    ratio = result["embed_items_per_second"] / result["model_only_items_per_second"]
    result["embed_over_model_only"] = round(ratio, 3)
    log(f"end-to-end: {result}")
    return result


def memory(package: Path, work: Path, sizes: tuple[int, int], log) -> dict[str, Any]:
    """Peak RSS of `retina embed` over tiny volumes (8x32x32 B-scans: the streaming, not the model,
    is under test) at two folder sizes."""
    out: dict[str, Any] = {"volume_shape": [8, 32, 32]}
    for n in sizes:
        folder = make_volumes(work / f"mem-{n}", n, (8, 32, 32), log)
        rss, summary = peak_rss_mb(package, folder, work / "store-mem", [])
        out[str(n)] = {"volumes": summary["embedded"], "peak_rss_mib": rss, "load": load_average()}
        log(f"memory: {n} volumes -> {summary['embedded']} embedded, peak RSS {rss} MiB")
    small, large = (out[str(n)]["peak_rss_mib"] for n in sizes)
    out["ratio"] = round(large / small, 3)
    return out


# --- retrieval --------------------------------------------------------------------------------------------


def clustered(n: int, dim: int, clusters: int, rng) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (within-cluster cosine ~0.5-0.8)."""
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * 0.04
        x = centres[rng.integers(0, clusters, size=m)] + noise
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def retrieval(sizes: list[int], dim: int, queries: int, log) -> dict[str, Any]:
    from retinacli.vector_index import installed
    from retinacli.vector_index.evaluate import exact_top_k, recall_at_k

    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"dim": dim, "queries": queries}
    for n in sizes:
        vectors = clustered(n, dim, max(10, n // 1000), rng)
        picks = rng.integers(0, n, size=queries)
        q = vectors[picks] + rng.standard_normal((queries, dim), dtype=np.float32) * 0.02
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        entry: dict[str, Any] = {"load_before": load_average()}
        single = []
        for i in range(min(queries, 20)):
            t = time.perf_counter()
            exact_top_k(vectors, q[i], 10)
            single.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, exact_ids = exact_top_k(vectors, q, 10)
        batched = (time.perf_counter() - t) / queries
        entry["exact_single_p50_ms"] = median_ms(single)
        entry[f"exact_batched_{queries}_ms_per_query"] = round(1000 * batched, 3)
        if installed("faiss"):
            from retinacli.vector_index.faiss_index import build_ivf, search_index

            t = time.perf_counter()
            index = build_ivf(vectors)
            entry["ann_build_seconds"] = round(time.perf_counter() - t, 1)
            entry["nlist"] = int(index.nlist)
            sweep = {}
            for nprobe in (4, 8, 16, 32, 64):
                if nprobe > index.nlist:
                    continue
                lat = []
                ids = []
                for i in range(queries):
                    t = time.perf_counter()
                    _, found = search_index(index, q[i], 10, nprobe=nprobe)
                    lat.append(time.perf_counter() - t)
                    ids.append(found[0])
                sweep[nprobe] = {
                    "p50_ms": median_ms(lat),
                    "p95_ms": round(1000 * float(np.percentile(lat, 95)), 3),
                    "recall_at_10": round(recall_at_k(np.array(ids), exact_ids), 4),
                }
            entry["ann"] = sweep
            good = [p for p, r in sweep.items() if r["recall_at_10"] >= 0.99]
            entry["ann_chosen_nprobe"] = min(good) if good else max(sweep)
            del index
        entry["load_after"] = load_average()
        results[str(n)] = entry
        log(f"retrieval {n}: {entry}")
        del vectors
    return results


# --- report ------------------------------------------------------------------------------------------------


def cohort_arrays(run: Path | None, spec: dict[str, Any], n: int) -> dict[str, np.ndarray] | None:
    """Real preprocessed items from the run's cohort manifest, when it is still on disk (else the
    encoders are timed on noise inputs, which is as fast)."""
    if run is None:
        return None
    try:
        from retinacli.cohort_manifest import read_cohort_manifest
        from training.data import load_pairs

        manifest = json.loads((run / "config.json").read_text()).get("manifest")
        data = load_pairs(read_cohort_manifest(manifest)[:n], spec)
        return {"oct": data.oct, "fundus": data.fundus}
    except Exception:
        return None


def torch_model_for(package: Path, run: Path | None):
    """The torch model behind the package: its run's checkpoint when given, else random weights
    (speed does not depend on them; the cosine column then compares against those weights' ONNX)."""
    from training.model import load_run

    if run is not None:
        return load_run(run).model.float().eval()
    raise SystemExit("--run RUN is needed for the package's torch baseline (the run it was exported from)")


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [BEGIN, "", "## CPU inference (benchmarks/run.py)", ""]
    lines.append(f"Run {res['started']} ({'--quick' if res['quick'] else 'full'}), {res['seconds']:.0f} s. "
                 f"CPU: {m['cpu']}, {m['cores']} cores ({m['logical_cpus']} logical), flags: "
                 f"{', '.join(m['flags'])}. Load average at start: {res['load_start']}. Versions: "
                 + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".")
    lines += ["", "The machine is shared: absolute times move with the load, so the headline numbers are "
              "ratios from interleaved rounds of the same run.", ""]
    if res.get("section_runs"):
        lines += ["Sections come from these runs (`--only` reruns replace single sections): "
                  + "; ".join(f"{k}: {v}" for k, v in sorted(res["section_runs"].items())) + ".", ""]
    for key, title in (("encoders_reference", "Encoders at the issue's reference sizes (random weights)"),
                       ("encoders_package", "Encoders at the package's input sizes")):
        if key not in res:
            continue
        lines += [f"### {title}", ""]
        lines += ["| encoder | input | GFLOP/item | engine | ms/item | speed-up vs torch eager fp32 | "
                  "min cosine to torch fp32 |", "|---|---|---|---|---|---|---|"]
        for modality, r in res[key].items():
            for engine, ms in r["ms_per_item"].items():
                shape = "x".join(map(str, r["input"]))
                lines.append(f"| {modality} | {shape}, batch {r['batch']} | {r['gflop_per_item']} | "
                             f"{engine} | {ms} | **{r['speedup_vs_torch'][engine]}x** | "
                             f"{r['min_cosine_to_torch_fp32'][engine]} |")
        loads = "; ".join(f"{k}: {v['load']}" for k, v in res[key].items())
        lines += ["", f"Median of {next(iter(res[key].values()))['rounds']} round-robin rounds, "
                  f"{next(iter(res[key].values()))['threads']} threads. Load: {loads}.", ""]
    if "floor" in res:
        f = res["floor"]
        lines += ["### Arithmetic floor", "",
                  f"Measured peak ({f['n']}^3 GEMM, {f['threads']} threads, load {f['load']}): "
                  + ", ".join(f"{k} {v} GFLOP/s (GOP/s for int8)" for k, v in f["gflops"].items()) + "."]
        for key in ("encoders_reference", "encoders_package"):
            for modality, r in res.get(key, {}).items():
                best = min(r["ms_per_item"], key=r["ms_per_item"].get)
                achieved = r["gflop_per_item"] / (r["ms_per_item"][best] / 1000)
                floor_ms = 1000 * r["gflop_per_item"] / f["gflops"]["torch sgemm"]
                lines.append(f"- {key.split('_')[1]} {modality}: {r['gflop_per_item']} GFLOP/item -> "
                             f"fp32 floor {floor_ms:.1f} ms/item at the sgemm peak; best engine ({best}) "
                             f"reaches {achieved:.1f} GFLOP/s effective.")
        lines.append("")
    if "end_to_end" in res:
        e = res["end_to_end"]
        lines += ["### End-to-end `retina embed` vs model only", "",
                  f"{e['items']} DICOM OCT volumes of {'x'.join(map(str, e['volumes_shape']))} "
                  "(the package's "
                  f"input size), batch {e['batch']}, engine {e['engine']}: `retina embed` "
                  f"{e['embed_items_per_second']} "
                  f"volumes/s (read + decode + preprocess + model + store), model only "
                  f"{e['model_only_items_per_second']} volumes/s -> **{e['embed_over_model_only']:.2f}** of "
                  f"model-only throughput. Load: {e['load']}.", ""]
    if "memory" in res:
        mem = res["memory"]
        sizes = [k for k in mem if k.isdigit()]
        lines += ["### Peak memory while streaming", "",
                  "Peak RSS of one `retina embed --modality oct` process (its VmHWM) over tiny "
                  f"synthetic DICOM volumes ({'x'.join(map(str, mem['volume_shape']))}; the model input size "
                  "is the package's):", ""]
        lines += [f"- {mem[k]['volumes']} volumes: {mem[k]['peak_rss_mib']} MiB (load {mem[k]['load']})"
                  for k in sizes]
        lines += [f"- ratio: **{mem['ratio']}**", ""]
    if "retrieval" in res:
        r = res["retrieval"]
        lines += ["### Retrieval", "",
                  f"{r['dim']}-d unit vectors in clusters (1 per 1,000 vectors), {r['queries']} queries "
                  "(noisy copies of stored vectors). Exact = numpy block scan "
                  "(retinacli.vector_index.evaluate.exact_top_k, "
                  "the same arithmetic as `retina retrieve --search exact`); ANN = faiss IVF-Flat "
                  "(inner product).",
                  "", "| vectors | exact p50 ms (1 query) | exact ms/query (batched) | ANN build s | nlist | "
                  "nprobe | ANN p50 ms | ANN p95 ms | recall@10 |", "|---|---|---|---|---|---|---|---|---|"]
        for n, e in r.items():
            if not n.isdigit():
                continue
            batched = next(v for k, v in e.items() if k.startswith("exact_batched"))
            if "ann" in e:
                for nprobe, a in e["ann"].items():
                    mark = " (chosen)" if int(nprobe) == e["ann_chosen_nprobe"] else ""
                    lines.append(f"| {int(n):,} | {e['exact_single_p50_ms']} | {batched} | "
                                 f"{e['ann_build_seconds']} | {e['nlist']} | {nprobe}{mark} | "
                                 f"{a['p50_ms']} | {a['p95_ms']} | {a['recall_at_10']} |")
            else:
                dashes = " - |" * 6
                lines.append(f"| {int(n):,} | {e['exact_single_p50_ms']} | {batched} |{dashes}")
        lines.append("")
    lines += [END]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="model package (from a demo-preset run)")
    parser.add_argument("--run", type=Path, help="training run the package came from (torch baseline)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--json", type=Path, help="raw results (default: --out with .json)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retina-bench")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--e2e-package", type=Path,
                        help="package for the end-to-end section (default --package); the model's cost "
                        "decides how much of it reading can hide")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller folders and stores")
    parser.add_argument("--only", default="floor,reference,package,e2e,memory,retrieval",
                        help="comma-separated sections to run")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s, load {load_average()}] {message}", file=sys.stderr,
              flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    rounds = 3 if args.quick else 7
    res: dict[str, Any] = {"started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "quick": args.quick, "machine": machine(), "load_start": load_average()}
    if "floor" in only:
        res["floor"] = gemm_floor(args.threads, args.quick)
        log(f"floor: {res['floor']}")
    if "reference" in only:
        folder, model = reference_package(args.work, log)
        res["encoders_reference"] = time_encoders(
            "reference", folder, model, {"oct": (1, 16, 112, 112), "fundus": (3, 224, 224)}, 2, rounds,
            args.threads, None, log)
        del model
    if "package" in only:
        descriptor = json.loads((args.package / "retina.json").read_text())
        model = torch_model_for(args.package, args.run)
        shapes = {m: tuple(descriptor["inputs"][m]["shape"][1:]) for m in ("oct", "fundus")}
        res["encoders_package"] = time_encoders(
            "package", args.package, model, shapes, 16, max(3, rounds - 2), args.threads,
            cohort_arrays(args.run, descriptor["preprocessing"], 16), log)
    if "e2e" in only:
        res["end_to_end"] = end_to_end(args.e2e_package or args.package, args.work,
                                       48 if args.quick else 200, 16, 1 if args.quick else 3, log)
    if "memory" in only:
        res["memory"] = memory(args.package, args.work, (50, 400) if args.quick else (100, 2000), log)
    if "retrieval" in only:
        sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
        res["retrieval"] = retrieval(sizes, 512, 50 if args.quick else 100, log)
    res["seconds"] = time.perf_counter() - started
    json_path = args.json or args.out.with_suffix(".json")
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    # --only reruns some sections: say which run each section of the merged file comes from
    res["section_runs"] = {**previous.get("section_runs", {}),
                           **{name: f"{res['started']}, load at start {res['load_start']}" for name in only}}
    json_path.write_text(json.dumps({**previous, **res}, indent=2) + "\n")
    write_markdown(args.out, markdown({**previous, **res}))
    log(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
