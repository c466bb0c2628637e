"""The evaluation cohort: manifest rows, labels per task, and the checks that run before any training.

Every check here is cheap (file existence, CSV columns, label values) so a bad manifest or run dir
fails in one line before minutes of embedding and fine-tuning are spent.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinacli.errors import UsageError
from training.evaluation.config import TASK_KINDS, TASK_LABEL_COLUMNS

REQUIRED_COLUMNS = ("patient_id", "eye", "visit", "oct_path", "fundus_path")


@dataclass
class Cohort:
    manifest: Path
    rows: list[dict[str, str]]
    patient_ids: np.ndarray  # (N,) str, pseudonyms from the manifest
    oct_paths: list[Path]
    fundus_paths: list[Path]

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, keep: np.ndarray) -> Cohort:
        return Cohort(
            manifest=self.manifest,
            rows=[self.rows[i] for i in keep],
            patient_ids=self.patient_ids[keep],
            oct_paths=[self.oct_paths[i] for i in keep],
            fundus_paths=[self.fundus_paths[i] for i in keep],
        )

    def labels(self, task: str) -> np.ndarray:
        """(N,) float; NaN where the row has no label."""
        column = TASK_LABEL_COLUMNS[task]
        return np.array([_parse_float(r.get(column)) for r in self.rows], dtype=float)


def _parse_float(text: str | None) -> float:
    if text is None or str(text).strip() == "":
        return math.nan
    return float(text)


def load_cohort(manifest: Path, tasks: tuple[str, ...]) -> Cohort:
    """Read and check the manifest; raise UsageError with a one-line reason if it cannot be evaluated."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UsageError(f"{manifest}: manifest not found")
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{manifest}: cannot read the manifest CSV ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    missing += [TASK_LABEL_COLUMNS[t] for t in tasks if TASK_LABEL_COLUMNS[t] not in columns]
    if missing:
        raise UsageError(f"{manifest}: missing column(s) {', '.join(missing)}")
    if not rows:
        raise UsageError(f"{manifest}: the manifest has no rows")
    base = manifest.parent
    oct_paths = [base / r["oct_path"] for r in rows]
    fundus_paths = [base / r["fundus_path"] for r in rows]
    for line, path in _first_missing(oct_paths, fundus_paths):
        raise UsageError(f"{path}: file not found (manifest {manifest.name} row {line})")
    cohort = Cohort(
        manifest=manifest,
        rows=rows,
        patient_ids=np.array([r["patient_id"] for r in rows], dtype=str),
        oct_paths=oct_paths,
        fundus_paths=fundus_paths,
    )
    for task in tasks:
        _check_labels(cohort, task)
    return cohort


def _first_missing(oct_paths: list[Path], fundus_paths: list[Path]):
    for i, (o, f) in enumerate(zip(oct_paths, fundus_paths, strict=True)):
        for path in (o, f):
            if not path.exists():
                yield i + 2, path  # CSV line number (header is line 1)
                return


def _check_labels(cohort: Cohort, task: str) -> None:
    column = TASK_LABEL_COLUMNS[task]
    try:
        y = cohort.labels(task)
    except ValueError as exc:
        raise UsageError(f"{cohort.manifest}: column {column} has a non-numeric value ({exc})") from None
    labelled = np.isfinite(y)
    if not labelled.any():
        raise UsageError(f"{cohort.manifest}: column {column} has no labels (task {task})")
    if TASK_KINDS[task] == "binary" and not set(np.unique(y[labelled])) <= {0.0, 1.0}:
        raise UsageError(f"{cohort.manifest}: column {column} must hold 0/1 labels (task {task})")


def check_run_dir(run_dir: Path) -> dict:
    """The run's config.json, after checking the files evaluation needs exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: run directory not found")
    for name in ("config.json", "preprocess.json", "checkpoints/last.pt"):
        if not (run_dir / name).is_file():
            raise UsageError(f"{run_dir}: not a finished training run (no {name})")
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{run_dir / 'config.json'}: unreadable ({exc})") from None


def label_summary(cohort: Cohort, tasks: tuple[str, ...]) -> dict[str, dict]:
    out = {}
    for task in tasks:
        y = cohort.labels(task)
        labelled = np.isfinite(y)
        info = {"rows": int(labelled.sum()), "patients": len(np.unique(cohort.patient_ids[labelled]))}
        if TASK_KINDS[task] == "binary":
            info["positive_rate"] = float(y[labelled].mean())
        else:
            info["mean"], info["sd"] = float(y[labelled].mean()), float(y[labelled].std(ddof=1))
        out[task] = info
    return out
