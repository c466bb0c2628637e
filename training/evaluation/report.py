"""results.json (every number, per fold), results.md (the paper-style table) and timings.json.

results.json holds only what the seed and the inputs determine — no wall times, no output paths — so
two runs with the same seed produce byte-identical files (timings go to timings.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retinacli.tasks import TASKS
from training.evaluation.probe import SWAP_KEY

RESULTS_SCHEMA = "retina-evaluation/1"
MODE_NAMES = {"probe": "linear probe", "finetune": "fine-tune"}
INPUT_NAMES = {"oct": "OCT", "fundus": "fundus", SWAP_KEY: "OCT head → fundus"}


def clean_json(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> null, floats rounded to 10 significant digits (stable text)."""
    from retinacli.jsonutil import clean_json as clean

    return clean(value, digits=10)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(clean_json(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")


def format_cell(summary: dict | None, metric: str) -> str:
    entry = (summary or {}).get(metric) or {}
    mean, sd = entry.get("mean"), entry.get("sd")
    if mean is None:
        return "–"
    digits = 1 if metric in ("mae", "rmse") else 3
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:.{digits}f}"


def results_markdown(results: dict) -> str:
    tasks = results["settings"]["tasks"]
    columns = [(t, m) for t in tasks for m in TASKS[t].metrics]
    lines = [
        "# retina evaluation",
        "",
        _cohort_line(results),
        "",
        f"{results['settings']['folds']}-fold cross-validation grouped by patient (mean ± sd over folds); "
        "binary thresholds chosen on training folds only. "
        f"`{SWAP_KEY}`: head fitted on OCT embeddings, applied to the paired fundus embeddings.",
        "",
        "| encoder | mode | input | "
        + " | ".join(f"{t.upper()} {TASKS[t].metric_label(m)}" for t, m in columns)
        + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for source, by_mode in results["cv"].items():
        label = results["sources"][source]["label"]
        for mode, by_input in by_mode.items():
            for input_key, by_task in by_input.items():
                cells = [format_cell((by_task.get(t) or {}).get("summary"), m) for t, m in columns]
                row = [label, MODE_NAMES.get(mode, mode), INPUT_NAMES.get(input_key, input_key), *cells]
                lines.append("| " + " | ".join(row) + " |")
    if results.get("retrieval"):
        lines += ["", "## Retrieval on held-out patients", "", _retrieval_table(results)]
    skipped = results.get("skipped") or []
    if skipped:
        lines += ["", "## Not evaluated", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def _cohort_line(results: dict) -> str:
    c = results["cohort"]
    parts = [f"Cohort: {c['rows']} visits (image pairs) from {c['patients']} patients"]
    for task, info in c.get("labelled", {}).items():
        rate = info.get("positive_rate")
        extra = f", positive rate {rate:.2f}" if rate is not None else ""
        parts.append(f"{task}: {info['rows']} labelled rows / {info['patients']} patients{extra}")
    return "; ".join(parts) + "."


def _retrieval_table(results: dict) -> str:
    ks = results["settings"]["retrieval_k"]
    header = (
        "| encoder | direction | pool | " + " | ".join(f"top-{k} (chance)" for k in ks) + " | median rank |"
    )
    rows = [header, "|---|---|---|" + "---|" * (len(ks) + 1)]
    for source, r in results["retrieval"].items():
        label = results["sources"][source]["label"]
        for direction in ("fundus_to_oct", "oct_to_fundus"):
            d = r.get(direction)
            if not d:
                continue
            cells = [f"{d[f'top{k}']:.3f} ({d[f'chance_top{k}']:.3f})" for k in ks]
            median = f"{d['median_rank']:.1f} (chance {d['chance_median_rank']:.1f})"
            name = direction.replace("_to_", " → ").replace("oct", "OCT")
            rows.append(f"| {label} | {name} | {r['pool_size']} | " + " | ".join(cells) + f" | {median} |")
    return "\n".join(rows)
