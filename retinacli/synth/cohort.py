"""Generate a synthetic paired cohort: anatomy -> images -> labels -> files + manifest.csv.

Everything is a pure function of the seed (no clock, no uuid4): identities, dates, UIDs and noise
come from random streams keyed by (seed, patient, eye, visit), so the same call writes the same
bytes, and a patient's anatomy does not depend on how many patients are generated.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retinacli.cohort_manifest import MANIFEST_COLUMNS as CONTRACT_COLUMNS
from retinacli.errors import UsageError
from retinacli.fsutil import atomic_path, atomic_write_text
from retinacli.privacy import pseudonym
from retinacli.synth.anatomy import EyeAnatomy, VisitState, sample_eye, sample_visits
from retinacli.synth.fundus import DEVICES, FundusGeometry, fundus_canvas, render_fundus
from retinacli.synth.labels import visit_labels
from retinacli.synth.oct import OctGeometry, oct_geometry, render_oct
from retinacli.synth.random import rng_for
from retinacli.synth.vessels import rasterize_vessels

FORMATS = ("dicom", "png")
DEFAULT_OCT_SHAPE = (25, 224, 256)
DEFAULT_FUNDUS_SIZE = 384
MANIFEST_COLUMNS = (
    *CONTRACT_COLUMNS,
    "visit_date",
    "fundus_device",
    "disease",
)
OCT_DEVICE = "SYNTH-OCT Spectral-Domain OCT"
GENERATOR_VERSION = "retina-synth 1"


@dataclass
class Identity:
    """Test identities written into DICOM (never into the manifest)."""

    patient_number: int  # 1-based
    patient_name: str  # SYNTH^P0001
    patient_id: str  # SYN000001
    birth_date: str  # YYYYMMDD
    sex: str
    pseudonym: str  # manifest patient_id


@dataclass
class VisitRecord:
    """One visit of one eye, with everything the writers need."""

    identity: Identity
    eye: EyeAnatomy
    state: VisitState
    acquired: dt.datetime  # fundus acquisition; OCT follows a few minutes later
    fundus_device: str  # "colour" | "nir"
    oct_pixels: np.ndarray
    oct_geo: OctGeometry
    fundus_pixels: np.ndarray
    fundus_geo: FundusGeometry
    labels: dict
    seed: int
    uids: dict = field(default_factory=dict)

    @property
    def accession(self) -> str:
        return f"SYNACC{self.identity.patient_number:05d}{self.state.visit:02d}"


def uid(seed: int, *parts: object) -> str:
    """A deterministic UUID-derived DICOM UID (2.25.<128-bit integer>), keyed like the random streams."""
    digest = hashlib.sha256(repr((GENERATOR_VERSION, seed, *parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _manifest_key(seed: int) -> bytes:
    return hashlib.sha256(f"retina-synth-manifest-key:{seed}".encode()).digest()


def _identity(seed: int, number: int) -> Identity:
    rng = rng_for(seed, "identity", number)
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 35)))
    pid = f"SYN{number:06d}"
    return Identity(
        patient_number=number,
        patient_name=f"SYNTH^P{number:04d}",
        patient_id=pid,
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["F", "M"])),
        pseudonym=pseudonym(pid, _manifest_key(seed), prefix="p"),
    )


def _patient_plan(seed: int, number: int, visits: int, nir_fraction: float):
    """Eyes, visit dates and times, fundus device. Each from its own stream, so a patient's eyes and
    device do not change with ``visits``, and visit k's date does not depend on later visits."""
    rng = rng_for(seed, "patient-eyes", number)
    eyes = ["OD", "OS"] if rng.random() < 0.6 else [str(rng.choice(["OD", "OS"]))]
    device = "nir" if rng_for(seed, "patient-device", number).random() < nir_fraction else "colour"
    schedule = rng_for(seed, "patient-dates", number)
    dates = [dt.date(2016, 1, 4) + dt.timedelta(days=int(schedule.integers(0, 6 * 365)))]
    for _ in range(visits - 1):
        dates.append(dates[-1] + dt.timedelta(days=int(schedule.integers(28, 120))))
    times = []
    for visit in range(visits):
        clock = rng_for(seed, "visit-time", number, visit)
        times.append(dt.time(*(int(v) for v in clock.integers((8, 0, 0), (17, 60, 60)))))
    return eyes, dates, times, device


def _generate_patient(job: tuple) -> list[dict]:
    """Render and write every visit of one patient; returns its manifest rows."""
    out_dir, seed, number, visits, oct_shape, fundus_size, formats, nir_fraction = job
    from retinacli.synth import writers

    identity = _identity(seed, number)
    eyes, dates, times, device = _patient_plan(seed, number, visits, nir_fraction)
    rows = []
    for eye_code in eyes:
        eye = sample_eye(seed, number, eye_code)
        states = sample_visits(seed, eye, dates)
        geo0 = oct_geometry(eye, oct_shape)
        arteries, veins = rasterize_vessels(eye.vessels, geo0.xs_eye, geo0.ys)
        vessel_map = np.maximum(arteries, veins)
        canvas = fundus_canvas(eye, fundus_size)
        for state in states:
            noise = rng_for(seed, "pixels", number, eye_code, state.visit)
            oct_pixels, oct_geo, _ = render_oct(eye, state, oct_shape, vessel_map, noise)
            fundus_pixels, fundus_geo = render_fundus(eye, state, canvas, device, noise)
            labels = visit_labels(eye, state, rng_for(seed, "labels", number, eye_code, state.visit))
            record = VisitRecord(
                identity=identity,
                eye=eye,
                state=state,
                acquired=dt.datetime.combine(state.date, times[state.visit]),
                fundus_device=device,
                oct_pixels=oct_pixels,
                oct_geo=oct_geo,
                fundus_pixels=fundus_pixels,
                fundus_geo=fundus_geo,
                labels=labels,
                seed=seed,
            )
            paths = {fmt: writers.write_visit(Path(out_dir), fmt, record) for fmt in formats}
            oct_rel, fundus_rel = paths[formats[0]]
            rows.append(
                {
                    "patient_id": identity.pseudonym,
                    "eye": eye_code,
                    "visit": state.visit,
                    "oct_path": oct_rel,
                    "fundus_path": fundus_rel,
                    "cst_um": labels["cst_um"],
                    "bcva_letters": labels["bcva_letters"],
                    "bcva_label": labels["bcva_label"],
                    "tn_label": labels["tn_label"],
                    "visit_date": state.date.isoformat(),
                    "fundus_device": DEVICES[device],
                    "disease": eye.disease,
                }
            )
    return rows


def parse_oct_shape(text: str) -> tuple[int, int, int]:
    """``"49x496x512"`` -> (49, 496, 512): B-scans x rows (depth) x columns (A-scans)."""
    try:
        parts = tuple(int(p) for p in text.lower().replace("×", "x").split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise UsageError(f"--oct-shape must look like 25x224x256 (B-scans x depth x width), got {text!r}")
    return parts  # type: ignore[return-value]


def _validate(patients, visits, oct_shape, fundus_size, formats, nir_fraction) -> tuple[str, ...]:
    if patients < 1:
        raise UsageError("--patients must be at least 1")
    if visits < 1:
        raise UsageError("--visits must be at least 1")
    s, h, w = oct_shape
    if s < 1 or h < 16 or w < 16 or s > 512 or h > 2048 or w > 2048:
        raise UsageError(f"--oct-shape {s}x{h}x{w} is out of range (1-512 B-scans, 16-2048 rows and columns)")
    if not 16 <= fundus_size <= 4096:
        raise UsageError(f"--fundus-size {fundus_size} is out of range (16-4096)")
    if not 0.0 <= nir_fraction <= 1.0:
        raise UsageError("--nir-fraction must be between 0 and 1")
    formats = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"--formats must be a comma-separated list of {', '.join(FORMATS)}, got {formats!r}")
    return formats


def generate_cohort(
    out_dir: str | os.PathLike,
    patients: int = 24,
    visits: int = 3,
    seed: int = 0,
    oct_shape: Sequence[int] = DEFAULT_OCT_SHAPE,
    fundus_size: int = DEFAULT_FUNDUS_SIZE,
    formats: Sequence[str] = ("dicom",),
    nir_fraction: float = 0.3,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a synthetic cohort to ``out_dir`` and return the path of its ``manifest.csv``.

    ``progress`` is called with the number of visits finished after each patient.
    ``workers`` processes render patients in parallel (default: the CPU count, at most 4);
    the output does not depend on it.
    """
    oct_shape = tuple(int(n) for n in oct_shape)
    formats = _validate(patients, visits, oct_shape, int(fundus_size), formats, nir_fraction)
    out = Path(out_dir)
    _prepare_output(out, overwrite)
    jobs = [
        (str(out), int(seed), n, int(visits), oct_shape, int(fundus_size), formats, float(nir_fraction))
        for n in range(1, patients + 1)
    ]
    workers = min(workers or min(os.cpu_count() or 1, 4), len(jobs))
    rows: list[dict] = []
    if workers <= 1:
        for job in jobs:
            done = _generate_patient(job)
            rows += done
            if progress:
                progress(len(done))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for done in pool.map(_generate_patient, jobs):
                rows += done
                if progress:
                    progress(len(done))
    manifest = out / "manifest.csv"
    # Written last and atomically: a killed run leaves no manifest, so it is not taken for a cohort.
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    info = {
        "generator": GENERATOR_VERSION,
        "seed": int(seed),
        "patients": int(patients),
        "visits_per_eye": int(visits),
        "oct_shape": list(oct_shape),
        "fundus_size": int(fundus_size),
        "formats": list(formats),
        "nir_fraction": float(nir_fraction),
        "manifest": "manifest.csv",
    }
    atomic_write_text(out / "cohort.json", json.dumps(info, indent=2) + "\n")
    return manifest


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{out}: folder is not empty (use --overwrite to replace a previous cohort)")
        if not (out / "manifest.csv").exists() and not (out / "cohort.json").exists():
            raise UsageError(f"{out}: not empty and not a synthetic cohort; refusing to overwrite it")
        for name in ("dicom", "png"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("manifest.csv", "cohort.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def cohort_summary(manifest: str | os.PathLike) -> dict:
    """Counts and label rates of a manifest (what `retina synth` prints at the end)."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    eyes = {(r["patient_id"], r["eye"]) for r in rows}

    def rate(col: str) -> float:
        vals = [int(r[col]) for r in rows if r[col] != ""]
        return round(sum(vals) / len(vals), 3) if vals else float("nan")

    cst = [float(r["cst_um"]) for r in rows]
    letters = [int(r["bcva_letters"]) for r in rows]
    return {
        "manifest": str(manifest),
        "patients": len({r["patient_id"] for r in rows}),
        "eyes": len(eyes),
        "visits": len(rows),
        "cst_um": {"min": min(cst), "median": float(np.median(cst)), "max": max(cst)},
        "bcva_letters": {"min": min(letters), "median": float(np.median(letters)), "max": max(letters)},
        "bcva_label_rate": rate("bcva_label"),
        "tn_label_rate": rate("tn_label"),
        "fundus_devices": dict(sorted(Counter(r["fundus_device"] for r in rows).items())),
    }
