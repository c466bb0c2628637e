"""Preprocessing alone, per item: the frozen reference (benchmarks/naive_preprocess.py) against
retinacli/preprocess.py, on `retina synth` renderings at acquisition and default sizes.

    python benchmarks/preprocess_speed.py [--reps 15] [--json out.json]

OCT inputs are the picked B-scans (what frame-selective reading hands over: 4 or 16 of 49); fundus
inputs are whole photos. Calls alternate (reference, fast, reference, ...) and the median is reported,
so load from other processes hits both sides alike. Wall time and CPU time (process_time: all threads of
this process, so BLAS threads count) are both reported; on a busy machine CPU time is the steadier
measure of the work per item. Also prints the largest difference of the outputs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from retinacli import preprocess as pp
from retinacli.synth.anatomy import sample_eye, sample_visits
from retinacli.synth.fundus import fundus_canvas, render_fundus
from retinacli.synth.oct import oct_geometry, render_oct
from retinacli.synth.random import rng_for
from retinacli.synth.vessels import rasterize_vessels


def _frozen():
    path = Path(__file__).resolve().parent / "naive_preprocess.py"
    spec = importlib.util.spec_from_file_location("naive_preprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs() -> dict[str, np.ndarray]:
    eye = sample_eye(7, 0, "OD")
    state = sample_visits(7, eye, [dt.date(2020, 1, 1)])[0]
    out = {}
    for shape in ((49, 496, 512), (25, 224, 256)):
        geo = oct_geometry(eye, shape)
        vessels = np.maximum(*rasterize_vessels(eye.vessels, geo.xs_eye, geo.ys))
        out[f"oct {shape[1]}x{shape[2]}"] = render_oct(eye, state, shape, vessels, rng_for(7, "p", 0))[0]
    for size in (384, 1536, 2048):
        canvas = fundus_canvas(eye, size)
        out[f"fundus RGB {size}"] = render_fundus(eye, state, canvas, "colour", rng_for(7, "p", 1))[0]
        if size > 384:
            gray = render_fundus(eye, state, canvas, "nir", rng_for(7, "p", 2))[0]
            out[f"fundus gray {size}"] = gray[..., 0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ref = _frozen()
    inputs = _inputs()
    specs = {"demo": pp.make_spec(oct_slices=4, oct_size=32, fundus_size=48),
             "reference": pp.make_spec(oct_slices=16, oct_size=112, fundus_size=224)}
    rows = []
    print("| input | spec (output) | wall before ms | wall after ms | wall speed-up | CPU before ms "
          "| CPU after ms | CPU speed-up | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec_name, spec in specs.items():
        for name, pixels in inputs.items():
            modality = name.split()[0]
            if modality == "oct":
                k = spec["oct"]["slices"]
                pixels = np.ascontiguousarray(pixels[pp.slice_indices(pixels.shape[0], k)])
                name = f"oct {k} of 49 B-scans {name.split()[1]}"
            diff = float(np.abs(pp.preprocess(modality, pixels, spec).astype(np.float64)
                                - ref.preprocess(modality, pixels, spec)).max())
            wall: dict[str, list[float]] = {"reference": [], "fast": []}
            cpu: dict[str, list[float]] = {"reference": [], "fast": []}
            for _ in range(args.reps):
                for side, module in (("reference", ref), ("fast", pp)):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    module.preprocess(modality, pixels, spec)
                    cpu[side].append(time.process_time() - start_cpu)
                    wall[side].append(time.perf_counter() - start)
            row = {"input": name, "spec": spec_name,
                   "output": "x".join(map(str, pp.preprocess(modality, pixels, spec).shape))}
            for label, times in (("wall", wall), ("cpu", cpu)):
                before, after = (float(np.median(times[s])) * 1e3 for s in ("reference", "fast"))
                row |= {f"{label}_before_ms": round(before, 2), f"{label}_after_ms": round(after, 2),
                        f"{label}_speedup": round(before / max(after, 1e-3), 1)}
            row["max_abs_diff"] = diff
            rows.append(row)
            print(f"| {name} | {spec_name} ({row['output']}) | {row['wall_before_ms']:.1f} "
                  f"| {row['wall_after_ms']:.2f} | {row['wall_speedup']:.0f}x | {row['cpu_before_ms']:.1f} "
                  f"| {row['cpu_after_ms']:.2f} | {row['cpu_speedup']:.0f}x | {diff:.1e} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
