"""Model fixtures: a tiny trained run (owned by the training work)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from retinacli.cohort_manifest import MANIFEST_COLUMNS


def write_noise_cohort(out: Path, patients: int = 6, visits: int = 2, seed: int = 0) -> Path:
    """`patients` x `visits` pairs of noise images (OCT 6x40x40 TIFF, fundus 40x40 PNG); returns the CSV.

    Independent of the synthetic-cohort generator, so training tests isolate the training code.
    """
    import tifffile
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        for v in range(visits):
            oct_name, fundus_name = f"oct_{p}_{v}.tif", f"fundus_{p}_{v}.png"
            tifffile.imwrite(out / oct_name, rng.integers(0, 256, size=(6, 40, 40), dtype=np.uint8))
            Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(out / fundus_name)
            rows.append({"patient_id": f"p{p:03d}", "eye": "OD", "visit": v, "oct_path": oct_name,
                         "fundus_path": fundus_name})
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="session")
def noise_cohort(tmp_path_factory) -> Path:
    """Manifest of a 6-patient x 2-visit noise cohort (PNG + TIFF)."""
    return write_noise_cohort(tmp_path_factory.mktemp("noise_cohort"))


@pytest.fixture(scope="session")
def tiny_run(tiny_cohort, tmp_path_factory) -> Path:
    """A run dir (contract 4) of the tiny preset trained on `tiny_cohort` (2 epochs, seconds)."""
    pytest.importorskip("torch")
    from training.config import resolve_config
    from training.loop import train

    config = resolve_config("tiny", overrides={"manifest": str(tiny_cohort / "manifest.csv"), "threads": 2})
    return train(config, tmp_path_factory.mktemp("tiny_run") / "run")
