"""The task registry: every clinical task a head can be fitted for, defined once.

Training (``training.heads``, ``training.probe``), export, evaluation, ``retina predict`` and
``retina pair`` all read :data:`TASKS`; adding a task is one :class:`Task` entry here (its label column
must be a cohort-manifest column, :data:`retinacli.cohort_manifest.LABEL_COLUMNS`). Torch- and
numpy-free, so the CLI can build its option help from it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from retinacli.errors import UsageError

KINDS = ("regression", "binary")

# Column titles of the metrics the evaluation reports; error metrics get the task's units.
METRIC_NAMES = {
    "mae": "MAE",
    "rmse": "RMSE",
    "r2": "R²",
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "balanced_accuracy": "balanced acc.",
}
_METRICS_IN_UNITS = ("mae", "rmse")


@dataclass(frozen=True)
class Task:
    """One task: which cohort-manifest column holds its label and how a head for it is fitted and read.

    ``kind`` "regression": a ridge head whose output is in ``units``; "binary": a logistic head whose
    output is the probability that the label is 1 (``label_meaning`` says what 1 means).
    ``metrics`` are the headline metrics of results.md, the main one first.
    """

    name: str
    column: str
    kind: str
    units: str | None
    label_meaning: str
    title: str
    metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.metrics or any(m not in METRIC_NAMES for m in self.metrics):
            raise ValueError(f"task {self.name}: metrics must be some of {', '.join(METRIC_NAMES)}")

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def is_binary(self) -> bool:
        return self.kind == "binary"

    def metric_label(self, metric: str) -> str:
        """``'MAE (µm)'`` for an error metric of a task with units, else the metric's plain title."""
        name = METRIC_NAMES[metric]
        return f"{name} ({self.units})" if metric in _METRICS_IN_UNITS and self.units else name

    def describe(self) -> str:
        """Short text for option help: ``'cst (µm)'``, ``'bcva (binary)'``."""
        return f"{self.name} ({self.units if self.kind == 'regression' else 'binary'})"


# One entry per task; a new task is one more entry (its column must be a cohort-manifest label column).
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("cst", column="cst_um", kind="regression", units="µm", title="CST (µm)", metrics=("mae", "r2"),
             label_meaning="central subfield thickness (mean retinal thickness in the central 1 mm circle), "
             "µm"),
        Task("bcva", column="bcva_label", kind="binary", units=None, metrics=("auroc",),
             title="BCVA < 70 letters",
             label_meaning="1 = best-corrected visual acuity below 70 ETDRS letters (worse than 20/40)"),
        Task("tn", column="tn_label", kind="binary", units=None, metrics=("auroc",),
             title="high treatment need", label_meaning="1 = high treatment need"),
        Task("bcva_letters", column="bcva_letters", kind="regression", units="letters",
             title="BCVA (ETDRS letters)", metrics=("mae", "r2"),
             label_meaning="best-corrected visual acuity, ETDRS letters (0-100; 70 letters = 20/40)"),
    )
}


def task_names() -> tuple[str, ...]:
    """Every task, in registry order (the default task set of probe and evaluate)."""
    return tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; a UsageError naming the valid tasks otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None


def parse_tasks(text: str, option: str = "--tasks") -> tuple[str, ...]:
    """``'tn, cst'`` -> ``('cst', 'tn')``: registry order, no duplicates; UsageError naming ``option``
    and the valid tasks for an unknown or empty list."""
    picked = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in picked if t not in TASKS]
    if unknown or not picked:
        why = f"unknown task(s) {', '.join(map(repr, unknown))}" if unknown else f"got {text!r}"
        raise UsageError(f"{option}: choose from {','.join(TASKS)} ({why})")
    return tuple(t for t in TASKS if t in picked)


def tasks_help() -> str:
    """``'cst (µm), bcva (binary), ...'`` for option help strings."""
    return ", ".join(task.describe() for task in TASKS.values())
