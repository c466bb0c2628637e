"""results.json (every number, per fold), results.md (the paper-style table) and timings.json.

results.json holds only what the seed and the inputs determine — no wall times, no output paths — so
two runs with the same seed produce byte-identical files (timings go to timings.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retinacli.tasks import TASKS
from training.evaluation.probe import REVERSE_SWAP_KEY, SWAP_KEY, SWAPS

RESULTS_SCHEMA = "retina-evaluation/1"
MODE_NAMES = {"probe": "linear probe", "finetune": "fine-tune"}
INPUT_NAMES = {"oct": "OCT", "fundus": "fundus", SWAP_KEY: "OCT head → fundus",
               REVERSE_SWAP_KEY: "fundus head → OCT"}


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
        f"Modality swap: `{SWAP_KEY}` (OCT head → fundus) is the head fitted on OCT embeddings applied to "
        f"the paired fundus embeddings, `{REVERSE_SWAP_KEY}` (fundus head → OCT) the reverse; same folds.",
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
    lines += _swap_section(results)
    if results.get("retrieval"):
        lines += ["", "## Retrieval on held-out patients", "", _retrieval_table(results)]
    skipped = results.get("skipped") or []
    if skipped:
        lines += ["", "## Not evaluated", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def _swap_section(results: dict) -> list[str]:
    """Each linear-probe swap against the same head on its own modality (fold means), with the bar that
    lets a package say "validated" (retinacli.headinfo.swap_verdict)."""
    from retinacli.headinfo import swap_bar, swap_verdict

    rows = []
    for source, by_mode in results["cv"].items():
        by_input = by_mode.get("probe") or {}
        for key, (fitted_on, applied_to) in SWAPS.items():
            for task, entry in (by_input.get(key) or {}).items():
                own_entry = (by_input.get(fitted_on) or {}).get(task)
                if not own_entry:
                    continue
                kind = TASKS[task].kind
                means = [{m: (v or {}).get("mean") for m, v in e["summary"].items()}
                         for e in (entry, own_entry)]
                verdict = swap_verdict(kind, means[1], means[0], fitted_on, applied_to)
                if kind == "regression":
                    shown = [f"MAE {format_cell(e['summary'], 'mae')}" for e in (entry, own_entry)]
                    shown[0] += f", R² {format_cell(entry['summary'], 'r2')}"  # the bar's floor
                    versus = "–" if verdict["ratio"] is None else f"{verdict['ratio']:.2f}x"
                else:
                    shown = [f"AUROC {format_cell(e['summary'], 'auroc')}" for e in (entry, own_entry)]
                    drop = verdict["auroc_drop"]
                    versus = "–" if drop is None else f"{abs(drop):.3f} {'below' if drop >= 0 else 'above'}"
                rows.append(
                    f"| {results['sources'][source]['label']} | {INPUT_NAMES[key]} | {task.upper()} | "
                    f"{shown[0]} | {shown[1]} | {versus} | {'met' if verdict['validated'] else 'missed'} |"
                )
    if not rows:
        return []
    return [
        "",
        "## Modality swap",
        "",
        "Linear probe, mean ± sd over the same folds: the head applied to the other modality against the "
        "same head on its own. The bar (what a package needs to call a head validated on the other "
        f"modality): regression, {swap_bar('regression', 'own modality', 'other modality')}; binary, "
        f"{swap_bar('binary', 'own modality', 'other modality')} (on the fold means).",
        "",
        "| encoder | swap | task | on the other modality | on its own modality | vs own | bar |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def _cohort_line(results: dict) -> str:
    c = results["cohort"]
    parts = [f"Cohort: {c['rows']} visits (image pairs) from {c['patients']} patients"]
    for task, info in c.get("labelled", {}).items():
        rate = info.get("positive_rate")
        extra = f", positive rate {rate:.2f}" if rate is not None else ""
        parts.append(f"{task}: {info['rows']} labelled rows / {info['patients']} patients{extra}")
    return "; ".join(parts) + "."


def _retrieval_table(results: dict) -> str:
    """Visit level and eye level, both directions: top-k / hit@k with exact chance, MRR, median rank."""
    ks = results["settings"]["retrieval_k"]
    levels = [
        ("Visit level", None, "top-", "only the query's own visit (its paired image) is a hit"),
        ("Eye level", "eye_level", "hit@", "any visit of the query's eye is a hit"),
    ]
    parts = [
        "The pool is every held-out visit; chance is the exact expected value under a random order "
        "(for the eye level, from the number of visits of each query's eye). A tie counts against the query."
    ]
    for title, key, name, hit in levels:
        if key and not any(r.get(key) for r in results["retrieval"].values()):
            continue  # results.json from before eye-level metrics
        parts += ["", f"### {title}: {hit}", ""]
        header = (
            "| encoder | direction | pool (visits) | eyes | "
            + " | ".join(f"{name}{k} (chance)" for k in ks)
            + " | MRR | median rank (chance) |"
        )
        rows = [header, "|---|---|---|---|" + "---|" * (len(ks) + 2)]
        for source, r in results["retrieval"].items():
            label = results["sources"][source]["label"]
            level = (r.get(key) or {}) if key else r
            eyes = (r.get("eye_level") or {}).get("eyes", "–")
            for direction in ("fundus_to_oct", "oct_to_fundus"):
                d = level.get(direction)
                if not d:
                    continue
                cells = [f"{d[f'top{k}']:.3f} ({d[f'chance_top{k}']:.3f})" for k in ks]
                median = f"{d['median_rank']:.1f} ({d['chance_median_rank']:.1f})"
                arrow = direction.replace("_to_", " → ").replace("oct", "OCT")
                rows.append(
                    f"| {label} | {arrow} | {d['pool_size']} | {eyes} | " + " | ".join(cells)
                    + f" | {d['mrr']:.3f} | {median} |"
                )
        parts.append("\n".join(rows))
    return "\n".join(parts)
