"""The task registry (retinacli.tasks) and the cohort-manifest reader (retinacli.cohort_manifest).

``bcva_letters`` (BCVA in ETDRS letters, a regression head) is the registry's fourth task: it was added
as one registry entry, and the tests below follow it through fit -> export -> predict and evaluate.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.cohort_manifest import (
    LABEL_COLUMNS,
    MANIFEST_COLUMNS,
    REQUIRED_COLUMNS,
    CohortManifestError,
    label_values,
    read_cohort_manifest,
)
from retinacli.errors import EXIT_USAGE, UsageError
from retinacli.tasks import TASKS, Task, get_task, parse_tasks, task_names, tasks_help

# --- the registry -------------------------------------------------------------------------------------


def test_every_task_reads_a_cohort_manifest_label_column():
    for task in TASKS.values():
        assert task.column in MANIFEST_COLUMNS, task.name
        assert task.column in LABEL_COLUMNS and task.column not in REQUIRED_COLUMNS, task.name
    # and every label column of the manifest belongs to a task (pair copies nothing no task reads)
    assert {t.column for t in TASKS.values()} == set(LABEL_COLUMNS)
    assert len({t.column for t in TASKS.values()}) == len(TASKS)  # one task per column


def test_registry_entries_are_complete_and_consistent():
    assert task_names() == ("cst", "bcva", "tn", "bcva_letters")  # registry order: the default task set
    for name, task in TASKS.items():
        assert task.name == name and task.kind in ("regression", "binary")
        assert task.label_meaning and task.title and task.metrics
        if task.kind == "regression":
            assert task.units and task.main_metric == "mae"
        else:
            assert task.units is None and task.main_metric == "auroc"
            assert task.label_meaning.startswith("1 = ")
    letters = get_task("bcva_letters")
    assert (letters.column, letters.kind, letters.units, letters.metrics) == (
        "bcva_letters", "regression", "letters", ("mae", "r2"),
    )
    assert letters.metric_label("mae") == "MAE (letters)"
    assert get_task("cst").metric_label("rmse") == "RMSE (µm)"
    assert get_task("bcva").metric_label("auroc") == "AUROC"


def test_bad_task_names_and_lists_are_usage_errors_naming_the_valid_tasks():
    with pytest.raises(UsageError, match=r"unknown task 'iop' \(known: cst, bcva, tn, bcva_letters\)"):
        get_task("iop")
    assert parse_tasks(" tn,CST, tn ") == ("cst", "tn")  # registry order, no duplicates
    assert parse_tasks(",".join(TASKS)) == task_names()
    with pytest.raises(UsageError, match=r"^--tasks: choose from cst,bcva,tn,bcva_letters \(unknown task"):
        parse_tasks("cst,iop")
    with pytest.raises(UsageError, match=r"^--only: choose from .* \(got ' , '\)"):
        parse_tasks(" , ", option="--only")
    with pytest.raises(ValueError, match="kind must be one of"):
        Task("x", "x", "ordinal", None, "x", "x", ("mae",))
    with pytest.raises(ValueError, match="metrics must be some of"):
        Task("x", "x", "binary", None, "x", "x", ("accuracy",))


@pytest.mark.parametrize("command", ["predict", "probe", "evaluate"])
def test_command_help_lists_every_registry_task(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "bcva_letters (letters)" in text and "cst (µm)" in text
    if command != "predict":  # the default task set is the whole registry
        assert ",".join(TASKS) in text.replace(" ", "")
    assert tasks_help() == "cst (µm), bcva (binary), tn (binary), bcva_letters (letters)"


def test_predict_refuses_a_task_outside_the_registry():
    result = CliRunner().invoke(app, ["predict", "--task", "iop"])
    assert result.exit_code == EXIT_USAGE
    assert "cst, bcva, tn, bcva_letters" in result.output


# --- the cohort manifest reader -----------------------------------------------------------------------


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


ROW = ["p1", "OD", "0", "imgs/oct.dcm", "../fundus.png", "301.5", "", "1", "0"]


def test_reader_resolves_paths_against_the_csv_folder_and_keeps_labels(tmp_path):
    manifest = _write(tmp_path / "cohort" / "manifest.csv", list(MANIFEST_COLUMNS), [ROW])
    (rows,) = read_cohort_manifest(manifest, label_columns=["cst_um", "bcva_letters"])
    assert rows["oct_path"] == str((tmp_path / "cohort" / "imgs" / "oct.dcm").resolve())
    assert rows["fundus_path"] == str((tmp_path / "fundus.png").resolve())
    cst, letters = (label_values([rows], c)[0] for c in ("cst_um", "bcva_letters"))
    assert cst == 301.5 and math.isnan(letters)  # empty cell: no label


@pytest.mark.parametrize(
    ("header", "rows", "kwargs", "message"),
    [
        (None, None, {}, "manifest.csv: manifest not found"),
        (["patient_id", "oct_path", "fundus_path"], [ROW[:1] + ROW[3:5]], {}, "missing column(s) eye, visit"),
        (list(MANIFEST_COLUMNS[:5]), [ROW[:5]], {"label_columns": ["bcva_letters"]},
         "missing column(s) bcva_letters"),
        (list(MANIFEST_COLUMNS), [], {}, "the manifest has no rows"),
        (list(MANIFEST_COLUMNS), [ROW, ["p2", "OS", "0", "", "f.png", "", "", "", ""]], {},
         "line 3 lacks patient_id, oct_path or fundus_path"),
        (list(MANIFEST_COLUMNS), [ROW, [*ROW[:6], "seventy", "", ""]], {"label_columns": ["bcva_letters"]},
         "line 3: column bcva_letters has a non-numeric value 'seventy'"),
        (list(MANIFEST_COLUMNS), [ROW, [*ROW[:6], "seventy", "", ""]],
         {"optional_label_columns": ["bcva_letters"]},
         "line 3: column bcva_letters has a non-numeric value 'seventy'"),
        (list(MANIFEST_COLUMNS), [ROW], {"check_files": True},
         "oct.dcm: file not found (manifest manifest.csv row 2)"),
    ],
)
def test_reader_errors_are_one_line_usage_errors_naming_the_file(tmp_path, header, rows, kwargs, message):
    manifest = tmp_path / "cohort" / "manifest.csv"
    if header is not None:
        _write(manifest, header, rows)
    with pytest.raises(CohortManifestError) as caught:
        read_cohort_manifest(manifest, **kwargs)
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert "manifest.csv" in text or "oct.dcm" in text
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == EXIT_USAGE
    assert isinstance(caught.value, ValueError)  # callers that treat bad data as ValueError still catch it


def test_optional_label_columns_may_be_absent_and_unchecked_cells_read_as_missing(tmp_path):
    header = list(MANIFEST_COLUMNS[:6])  # no bcva_letters column at all
    manifest = _write(tmp_path / "manifest.csv", header, [[*ROW[:5], "n/a"]])
    rows = read_cohort_manifest(manifest, optional_label_columns=["bcva_letters"])
    assert math.isnan(label_values(rows, "bcva_letters")[0])
    assert math.isnan(label_values(rows, "cst_um")[0])  # not checked: an unparseable cell is no label


# --- bcva_letters end to end ---------------------------------------------------------------------------


def test_bcva_letters_head_is_fitted_in_letters():
    from training.heads import fit_linear_head

    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    true_w = np.array([30.0, -12.0, 0.0, 8.0, 0.0, 0.0])
    y = 65.0 + x @ true_w + rng.normal(scale=0.5, size=120)
    head = fit_linear_head("bcva_letters", x, y)
    assert (head.kind, head.units, head.threshold) == ("regression", "letters", None)
    assert head.label_meaning == TASKS["bcva_letters"].label_meaning
    np.testing.assert_allclose(head.weight, true_w, atol=1.0)
    assert abs(head.bias - 65.0) < 0.5 and head.metrics["cv"]["mae"] < 0.8


def _manifest_letters(cohort: Path) -> dict[str, float]:
    rows = read_cohort_manifest(cohort / "manifest.csv", label_columns=["bcva_letters"])
    return {r["oct_path"]: float(r["bcva_letters"]) for r in rows if r["bcva_letters"]}


def test_bcva_letters_is_probed_exported_and_predicted(tiny_cohort, tiny_package, tiny_package_run, tmp_path,
                                                     monkeypatch):
    pytest.importorskip("torch")
    from retinacli.engine import Engine
    from training.heads import load_heads

    # probe (default tasks: the whole registry) fitted it on the cohort's bcva_letters column
    heads = {h.task: h for h in load_heads(tiny_package_run)}
    letters = _manifest_letters(tiny_cohort)
    assert set(heads) == set(TASKS)
    head = heads["bcva_letters"]
    assert head.kind == "regression" and head.units == "letters" and head.n_train == len(letters) > 0
    # export put it in the package, described by the registry
    descriptor = json.loads((tiny_package / "retina.json").read_text())
    entry = descriptor["heads"]["bcva_letters"]
    assert entry["kind"] == "regression" and entry["units"] == "letters"
    assert (tiny_package / entry["file"]).is_file()
    engine = Engine.load(tiny_package, threads=1)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, engine.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = engine.predict_raw("bcva_letters", emb)
    np.testing.assert_allclose(got, head.predict(emb), rtol=1e-4, atol=1e-3)
    # retina predict --task bcva_letters on OCT files: one value in letters per file, the engine's value
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "home"))
    files = sorted(letters)[:2]
    result = CliRunner().invoke(
        app, ["predict", *files, "--task", "bcva_letters", "--model", str(tiny_package), "--json"]
    )
    assert result.exit_code == 0, result.output
    preds = json.loads(result.stdout)["predictions"]
    assert [p["path"] for p in preds] == [Path(f).name for f in files]  # relative to each file's folder
    from retinacli.readers import read_oct

    batch = np.stack([engine.preprocess(read_oct(f)) for f in files])
    expected = engine.predict_raw("bcva_letters", engine.embed("oct", batch))
    for pred, value in zip(preds, expected, strict=True):
        assert pred["task"] == "bcva_letters" and pred["units"] == "letters" and "probability" not in pred
        assert pred["value"] == pytest.approx(float(value), abs=1e-3)


def test_bcva_letters_is_evaluated(tiny_cohort, tiny_run, tmp_path):
    pytest.importorskip("torch")
    from training.evaluation import EvalConfig
    from training.evaluation.protocol import run_evaluation

    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    cfg = EvalConfig(
        manifest=cohort / "manifest.csv", runs=[tiny_run], out_dir=tmp_path / "ev", baseline="none", folds=2,
        modes=("probe",), tasks=("bcva_letters",), modalities=("oct",), figures=False,
    )
    results = run_evaluation(cfg)
    cv = results["cv"]["clip"]["probe"]["oct"]["bcva_letters"]
    assert sum(f["n"] for f in cv["folds"]) == len(_manifest_letters(tiny_cohort))
    assert all(f["mae"] > 0 and f["rmse"] >= f["mae"] for f in cv["folds"])
    assert cv["summary"]["mae"]["mean"] == pytest.approx(np.mean([f["mae"] for f in cv["folds"]]))
    assert results["cohort"]["labelled"]["bcva_letters"]["rows"] == len(_manifest_letters(tiny_cohort))
    table = (tmp_path / "ev" / "results.md").read_text()
    assert "BCVA_LETTERS MAE (letters)" in table and "BCVA_LETTERS R²" in table


def test_demo_summary_has_a_column_for_every_registry_task(capsys):
    """The demo's results table is built from the registry: a new task shows up without an edit."""
    from types import SimpleNamespace

    from retinacli.commands.demo import _print_summary

    ranks = {"top1": 0.1, "top5": 0.4, "chance_top1": 0.01, "chance_top5": 0.06, "pool_size": 88}
    heads = {"cst": {"mae": 61.0, "r2": 0.25}, "bcva": {"auroc": 0.71}, "tn": {"auroc": 0.66},
             "bcva_letters": {"mae": 7.9, "r2": 0.31}}
    result = {"retrieval": {"fundus_to_oct": ranks, "oct_to_fundus": ranks}, "heads_cv": heads}
    summary = SimpleNamespace(
        objectives={"clip": result}, cohort={"pairs": 10, "patients": 4}, seconds={"total": 1.0},
        workdir="demo", card={"same_eye_top5": {"top5": 0.5, "queries": 4, "chance_top5": 0.2},
                              "embed": {"embedded": 4}, "predict_records": 4, "default_model": "m"},
    )
    _print_summary(summary)
    text = capsys.readouterr().out
    cells = [cell.strip() for line in text.splitlines() for cell in line.split("│")]
    assert set(TASKS) <= set(cells)  # one row a task, at the 80 columns of a plain terminal
    assert {"8 / 0.31", "61 / 0.25", "0.71", "0.66"} <= set(cells)
