"""Peak RSS of `retina embed` over a folder of good files, with and without decompression bombs mixed in.

Builds, in a temp folder: a toy model package (tests/fixtures_packages.make_toy_package), a folder of
good acquisitions (fundus JPEGs and deflate-TIFF OCT volumes of realistic size) and a copy of it with
the bombs of tests/bombs.py added (a 1.5 KB JPEG 2000 DICOM declaring 7.2e9 samples, a 39 KB TIFF
decoding to 3.4 GB, a patched TIFF, a PNG and .npy headers declaring gigabytes, a truncated .npy). Runs
`retina embed` on each folder `--repeat` times in a fresh process and reports the peak RSS (the
child's ru_maxrss) and wall time. The claim (docs/reliability.md, "Limits: decoded size"): with bombs
the peak stays within 1.2x of the peak without.

    .venv/bin/python benchmarks/bomb_rss.py [--repeat 3] [--photos 12] [--volumes 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def build_good(folder: Path, photos: int, volumes: int) -> None:
    import tifffile
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:2000, 0:2000]
    for i in range(photos):  # 2000 x 2000 RGB fundus-like photos (12e6 samples each)
        base = (np.sin(x / (40 + i)) + np.cos(y / (55 + i))) * 60 + 120
        rgb = np.stack([base, base * 0.6, base * 0.3], axis=-1) + rng.normal(0, 3, (2000, 2000, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"photo_{i}.jpg", quality=90)
    for i in range(volumes):  # 64 x 496 x 512 OCT cubes (16e6 voxels each)
        cube = rng.integers(0, 40, (64, 496, 512), dtype=np.uint8)
        cube[:, 200:260] += 120
        tifffile.imwrite(folder / f"oct_{i}.tif", cube, compression="zlib")


def embed_peak(folder: Path, package: Path, store: Path) -> tuple[float, float, str]:
    """(peak RSS MB, seconds, last stderr line) of one `retina embed` run in a fresh process."""
    shutil.rmtree(store, ignore_errors=True)
    retina = Path(sys.executable).parent / "retina"
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.monotonic()\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps([peak, time.monotonic() - t, done.returncode, done.stdout, done.stderr]))\n"
    )
    command = [str(retina), "embed", str(folder), "--model", str(package), "--store", str(store), "--json"]
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True,
                         check=True)
    peak, seconds, code, stdout, _stderr = json.loads(out.stdout)
    summary = json.loads(stdout) if stdout.strip() else {}
    note = f"exit {code}, embedded {summary.get('embedded')}, failed {summary.get('failed')}"
    return peak, seconds, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--volumes", type=int, default=4)
    args = parser.parse_args()
    from bombs import build_bombs
    from fixtures_packages import make_toy_package

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        package = make_toy_package(root / "toy")
        good = root / "good"
        build_good(good, args.photos, args.volumes)
        mixed = root / "mixed"
        shutil.copytree(good, mixed)
        bombs = build_bombs(mixed)
        good_mb = sum(p.stat().st_size for p in good.iterdir()) / 1e6
        bomb_kb = sum(p.stat().st_size for p in bombs) / 1e3
        print(f"good: {len(list(good.iterdir()))} files, {good_mb:.1f} MB; bombs: {len(bombs)} files, "
              f"{bomb_kb:.1f} KB")
        results: dict[str, list[tuple[float, float, str]]] = {"good": [], "good + bombs": []}
        for _ in range(args.repeat):  # interleaved, so background load affects both alike
            results["good"].append(embed_peak(good, package, root / "store_good"))
            results["good + bombs"].append(embed_peak(mixed, package, root / "store_mixed"))
        print("| folder | peak RSS MB (median) | runs | wall s (median) | result |")
        print("|---|---|---|---|---|")
        medians = {}
        for name, runs in results.items():
            peaks = [r[0] for r in runs]
            medians[name] = statistics.median(peaks)
            print(f"| {name} | {medians[name]:.0f} | {', '.join(f'{p:.0f}' for p in peaks)} | "
                  f"{statistics.median(r[1] for r in runs):.1f} | {runs[0][2]} |")
        ratio = medians["good + bombs"] / medians["good"]
        print(f"ratio (with bombs / without): {ratio:.3f} (claim: <= 1.2)")
        print(f"this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
              f"{time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
