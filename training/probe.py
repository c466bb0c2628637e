"""`retina probe RUN`: embed a cohort with the run's torch encoders and fit the task heads.

Heads are fitted with :func:`training.heads.fit_linear_head` (the one head-fitting code path) on the
OCT embeddings by default (the paper's setting), with patient-grouped out-of-fold metrics, and
written to ``RUN/heads.json`` where ``retina export`` picks them up. The paired embeddings of the other
modality go along for the modality swap (``metrics.swap`` / ``metrics.cv_by_modality``, see
:mod:`training.heads`), so the package can say whether a head holds on the other modality.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.cohort_manifest import label_values
from retinacli.tasks import TASKS, task_names
from training.heads import LinearHead, fit_linear_head, save_heads

MODALITIES = ("oct", "fundus")


# --- cohort manifest (read with retinacli.cohort_manifest: the same reader training uses) ----------


def label_array(rows: list[dict[str, str]], task: str) -> np.ndarray:
    """The task's labels (its registry column) as float64, NaN where the row has none."""
    return np.array(label_values(rows, TASKS[task].column), dtype=np.float64).reshape(-1)


def resolve_manifest_path(config: dict[str, Any], run_dir: Path, explicit: str | Path | None) -> Path:
    """The manifest to use: explicit, else the run's (as recorded; relative to cwd, then the run)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: cohort manifest not found")
        return path
    recorded = config.get("manifest")
    if not recorded:
        raise FileNotFoundError(f"{run_dir}: the run records no manifest; pass --manifest")
    for candidate in (Path(recorded), run_dir / recorded):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{recorded}: the run's cohort manifest is not there any more; pass --manifest")


# --- probing -----------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    heads: list[LinearHead]
    skipped: dict[str, str]  # task -> why no head was fitted
    n_rows: int
    n_embedded: int
    errors: list[str]
    manifest: Path
    heads_path: Path | None

    def to_dict(self) -> dict[str, Any]:
        from training.heads import _json_safe

        return _json_safe(
            {
                "manifest": str(self.manifest),
                "rows": self.n_rows,
                "embedded": self.n_embedded,
                "heads_file": str(self.heads_path) if self.heads_path else None,
                "heads": {
                    h.task: {
                        "kind": h.kind,
                        "n_train": h.n_train,
                        "threshold": h.threshold,
                        "units": h.units,
                        "input_modality": h.input_modality,
                        "metrics": h.metrics,
                    }
                    for h in self.heads
                },
                "skipped": self.skipped,
                "errors": self.errors,
            }
        )


def probe_run(
    run_dir: str | Path,
    manifest: str | Path | None = None,
    tasks: Iterable[str] | None = None,
    modality: str = "oct",
    seed: int = 0,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    loaded: Any = None,
) -> ProbeResult:
    """Embed the manifest with the run's encoder for ``modality``, fit one head per task with labels,
    save them to ``RUN/heads.json``. ``tasks``: default every registry task (one without labels in
    the manifest is skipped, with the reason). ``progress(done, total)`` is called per manifest row read.
    ``loaded``: an already loaded run (``training.model.load_run``) to reuse."""
    from retinacli.errors import UsageError
    from training.model import load_run

    tasks = list(task_names() if tasks is None else tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(TASKS)})")
    if modality not in MODALITIES:
        raise UsageError(f"unknown modality {modality!r} (use oct or fundus)")
    from retinacli.cohort_manifest import read_cohort_manifest
    from retinacli.package import sha256_file
    from training.data import load_pairs, load_pairs_once

    run = loaded if loaded is not None else load_run(run_dir)
    manifest_path = resolve_manifest_path(run.config, Path(run_dir), manifest)
    # label cells are checked where the column exists; a task whose column is absent is skipped below
    rows = read_cohort_manifest(manifest_path, optional_label_columns=[TASKS[t].column for t in tasks])
    # Only rows with at least one label are worth reading.
    wanted = [r for r in rows if any(np.isfinite(label_array([r], t)[0]) for t in tasks)]
    if not wanted:
        raise ValueError(f"{manifest_path}: no row has a label for {', '.join(tasks)}")
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(wanted))

    def load() -> Any:  # the training loader: readers + preprocess
        return load_pairs(wanted, run.spec, on_progress=tick)

    if len(wanted) == len(rows):  # the training run's cohort: reuse its arrays when this process has them
        data = load_pairs_once(sha256_file(manifest_path), run.spec, load)
    else:
        data = load()
    other = "fundus" if modality == "oct" else "oct"
    arrays = {"oct": data.oct, "fundus": data.fundus}
    embeddings = run.model.encode(modality, arrays[modality], batch_size)
    # the paired visits seen through the other encoder: the same heads' out-of-fold swap
    swapped = run.model.encode(other, arrays[other], batch_size)
    groups = np.array([r["patient_id"] for r in data.rows])
    labels = {t: label_array(data.rows, t) for t in tasks}
    heads: list[LinearHead] = []
    skipped: dict[str, str] = {}
    for task in tasks:
        y = labels[task]
        if not np.isfinite(y).any():
            skipped[task] = "no labels in the manifest"
            continue
        try:
            head = fit_linear_head(task, embeddings, y, seed=seed, groups=groups, input_modality=modality,
                                   swap_embeddings={other: swapped})
            heads.append(head)
        except ValueError as exc:
            skipped[task] = str(exc)
    heads_path = None
    if heads:
        from retinacli.preprocess import spec_hash

        extra = {"manifest": str(manifest_path), "spec_hash": spec_hash(run.spec), "seed": seed}
        heads_path = save_heads(run_dir, heads, extra=extra)
    return ProbeResult(heads, skipped, len(rows), len(data.rows), data.errors, manifest_path, heads_path)
