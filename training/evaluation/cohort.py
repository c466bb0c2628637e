"""The evaluation cohort: manifest rows, labels per task, and the checks that run before any training.

Every check here is cheap (file existence, CSV columns, label values) so a bad manifest or run dir
fails in one line before minutes of embedding and fine-tuning are spent. The CSV itself is read by
:func:`retinacli.cohort_manifest.read_cohort_manifest`, the reader training uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinacli.cohort_manifest import label_values, read_cohort_manifest
from retinacli.errors import UsageError
from retinacli.tasks import TASKS


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
        return np.array(label_values(self.rows, TASKS[task].column), dtype=float).reshape(-1)


def load_cohort(manifest: Path, tasks: tuple[str, ...]) -> Cohort:
    """Read and check the manifest (columns, files); raise UsageError with a one-line reason if it cannot
    be read. Each task's labels are judged by `label_problem` (an unusable task is skipped, not fatal)."""
    manifest = Path(manifest)
    rows = read_cohort_manifest(manifest, label_columns=[TASKS[t].column for t in tasks], check_files=True)
    cohort = Cohort(
        manifest=manifest,
        rows=rows,
        patient_ids=np.array([r["patient_id"] for r in rows], dtype=str),
        oct_paths=[Path(r["oct_path"]) for r in rows],
        fundus_paths=[Path(r["fundus_path"]) for r in rows],
    )
    return cohort


def label_problem(cohort: Cohort, task: str) -> str | None:
    """Why the task's labels cannot be evaluated (no labels, not 0/1 for a binary task), or None."""
    column = TASKS[task].column
    y = cohort.labels(task)  # cells already checked numeric by the reader
    labelled = np.isfinite(y)
    if not labelled.any():
        return f"column {column} has no labels"
    if TASKS[task].kind == "binary" and not set(np.unique(y[labelled])) <= {0.0, 1.0}:
        return f"column {column} must hold 0/1 labels"
    return None


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
        if TASKS[task].kind == "binary":
            info["positive_rate"] = float(y[labelled].mean())
        else:
            info["mean"], info["sd"] = float(y[labelled].mean()), float(y[labelled].std(ddof=1))
        out[task] = info
    return out
