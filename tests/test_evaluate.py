"""`retina evaluate` end to end on the tiny cohort and tiny run: outputs, leakage, reproducibility, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from retinacli.cli import app  # noqa: E402
from retinacli.tasks import TASKS  # noqa: E402
from training.evaluation import EvalConfig  # noqa: E402
from training.evaluation.folds import read_folds_csv  # noqa: E402
from training.evaluation.protocol import run_evaluation  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _manifest_rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cli_eval(tiny_cohort, tiny_run, tmp_path_factory):
    """One CLI evaluation (baseline + tiny run, probe + 1-epoch fine-tune, 3 folds, figures, --json)."""
    out = tmp_path_factory.mktemp("eval") / "ev"
    result = CliRunner().invoke(
        app,
        [
            "evaluate", "--manifest", str(tiny_cohort / "manifest.csv"), "--runs", str(tiny_run),
            "--out", str(out), "--folds", "3", "--tasks", "cst,bcva", "--finetune-epochs", "1",
            "--seed", "3", "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, result


def test_outputs_and_table(cli_eval, tiny_cohort, tiny_run):
    out, result = cli_eval
    val = set(json.loads((tiny_run / "split.json").read_text())["val"])  # the baseline's held-out too
    results = json.loads((out / "results.json").read_text())
    assert json.loads(result.stdout) == results  # --json prints results.json
    assert set(results["sources"]) == {"baseline", "clip"}
    rows = _manifest_rows(tiny_cohort / "manifest.csv")
    assert results["cohort"]["rows"] == len(rows)
    for source in ("baseline", "clip"):
        probe = results["cv"][source]["probe"]
        assert set(probe) == {"oct", "fundus", "oct_to_fundus", "fundus_to_oct"}  # both modality swaps
        assert set(results["cv"][source]["finetune"]) == {"oct"}
        by_tasks = (probe["oct"], probe["oct_to_fundus"], probe["fundus_to_oct"],
                    results["cv"][source]["finetune"]["oct"])
        for by_task in by_tasks:
            cst, bcva = by_task["cst"], by_task["bcva"]
            assert [f["fold"] for f in cst["folds"]] == [0, 1, 2]
            assert sum(f["n"] for f in cst["folds"]) == sum(1 for r in rows if r["cst_um"])
            for f in cst["folds"]:
                assert f["mae"] > 0 and f["rmse"] >= f["mae"]
            maes = [f["mae"] for f in cst["folds"]]
            assert cst["summary"]["mae"]["mean"] == pytest.approx(np.mean(maes))
            assert cst["summary"]["mae"]["sd"] == pytest.approx(np.std(maes, ddof=1))
            for f in bcva["folds"]:
                assert 0 <= f["threshold"] <= 1
                assert f["auroc"] is None or 0 <= f["auroc"] <= 1
        r = results["retrieval"][source]
        assert r["pool_size"] >= 2
        assert r["fundus_to_oct"]["chance_top1"] == pytest.approx(1 / r["pool_size"])
        # eye level: the held-out pool's eyes from the manifest, every visit of the query's eye a hit
        eye = r["eye_level"]
        assert eye["eyes"] == len({(x["patient_id"], x["eye"]) for x in rows if x["patient_id"] in val})
        for direction in ("fundus_to_oct", "oct_to_fundus"):
            assert eye[direction]["pool_size"] == r["pool_size"] == eye[direction]["queries"]
            for k in (1, 5, 10):
                assert eye[direction][f"top{k}"] >= r[direction][f"top{k}"]
                assert eye[direction][f"chance_top{k}"] >= r[direction][f"chance_top{k}"]
    table = (out / "results.md").read_text()
    assert "### Visit level" in table and "### Eye level" in table and "hit@5 (chance)" in table
    assert "| CLIP | linear probe | OCT |" in table
    assert "| baseline (random init) | fine-tune | OCT |" in table
    assert "OCT head → fundus" in table and "CST MAE (µm)" in table and "BCVA AUROC" in table
    assert "| CLIP | linear probe | fundus head → OCT |" in table and "## Modality swap" in table
    assert "| CLIP | OCT head → fundus | CST | MAE " in table
    assert "±" in table and "fundus → OCT" in table
    timings = json.loads((out / "timings.json").read_text())
    assert timings["seconds"]["total"] > 0 and "timings" not in results


def test_folds_csv_never_places_a_patient_in_two_folds(cli_eval, tiny_cohort):
    out, _ = cli_eval
    with open(out / "folds.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    patients = [r["patient_id"] for r in table]
    assert len(patients) == len(set(patients))  # one row per patient, so one fold per patient and task
    folds = read_folds_csv(out / "folds.csv")
    assert set(folds) == {"cst", "bcva"}
    rows = _manifest_rows(tiny_cohort / "manifest.csv")
    assert set(patients) == {r["patient_id"] for r in rows}  # the manifest's pseudonyms, nothing else
    results = json.loads((out / "results.json").read_text())
    for task, column in (("cst", "cst_um"), ("bcva", "bcva_label")):
        # fold sizes in results.json are the rows of the patients folds.csv assigns to each fold
        per_fold = [0, 0, 0]
        for r in rows:
            if r[column] != "":
                per_fold[folds[task][r["patient_id"]]] += 1
        assert per_fold == results["folds"][task]["rows_per_fold"]
        assert [f["n"] for f in results["cv"]["clip"]["probe"]["oct"][task]["folds"]] == per_fold
    text = (out / "folds.csv").read_text() + (out / "results.json").read_text()
    assert "SYN0" not in text and "SYNTH^" not in text  # DICOM identities never leak


def test_same_seed_gives_identical_results_json(cli_eval, tiny_cohort, tiny_run, tmp_path):
    out, _ = cli_eval
    cfg = EvalConfig(
        manifest=tiny_cohort / "manifest.csv",
        runs=[tiny_run],
        out_dir=tmp_path / "again",
        folds=3,
        tasks=("cst", "bcva"),
        finetune_epochs=1,
        seed=3,
        figures=False,
    )
    run_evaluation(cfg)
    assert (tmp_path / "again" / "results.json").read_bytes() == (out / "results.json").read_bytes()
    assert (tmp_path / "again" / "folds.csv").read_bytes() == (out / "folds.csv").read_bytes()


def test_figures_are_pngs_with_the_expected_names(cli_eval):
    out, _ = cli_eval
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == [
        "retrieval_baseline.png", "retrieval_clip.png", "tsne_baseline.png", "tsne_clip.png",
        "tsne_modality_baseline.png", "tsne_modality_clip.png",
    ]
    from PIL import Image

    for name in names:
        path = out / "figures" / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as image:
            assert image.width > 300 and image.height > 300
            assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas


def _invoke(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args])


def _one_line_error(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_missing_label_column_fails_early_with_exit_2(tiny_cohort, tiny_run, tmp_path):
    rows = _manifest_rows(tiny_cohort / "manifest.csv")
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    with open(cohort / "manifest.csv", "w", newline="") as handle:
        columns = [c for c in rows[0] if c != "tn_label"]
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "ev"
    result = _invoke("--manifest", str(cohort / "manifest.csv"), "--runs", str(tiny_run), "--out", str(out))
    assert result.exit_code == 2
    line = _one_line_error(result)
    assert "missing column(s) tn_label" in line and "manifest.csv" in line
    assert not out.exists()  # nothing ran, nothing written
    # the same manifest works when the task that needs the column is left out
    ok = _invoke(
        "--manifest", str(cohort / "manifest.csv"), "--runs", str(tiny_run), "--out", str(out),
        "--tasks", "cst", "--modes", "probe", "--folds", "2", "--no-figures",
    )
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("what", ["manifest", "run", "image", "folds", "option"])
def test_bad_inputs_fail_early_in_one_line(what, tiny_cohort, tiny_run, tmp_path):
    manifest, run, extra = str(tiny_cohort / "manifest.csv"), str(tiny_run), []
    if what == "manifest":
        manifest = str(tmp_path / "nope.csv")
    elif what == "run":
        run = str(tmp_path / "no_run")
    elif what == "image":
        cohort = tmp_path / "cohort"
        shutil.copytree(tiny_cohort, cohort)
        first = _manifest_rows(cohort / "manifest.csv")[0]
        (cohort / first["oct_path"]).unlink()
        manifest = str(cohort / "manifest.csv")
    elif what == "folds":
        extra = ["--folds", "50"]
    else:
        extra = ["--tasks", "cst,vision"]
    out = tmp_path / "ev"
    result = _invoke("--manifest", manifest, "--runs", run, "--out", str(out), *extra)
    assert result.exit_code == 2, result.output
    line = _one_line_error(result)
    expected = {
        "manifest": "nope.csv: manifest not found",
        "run": "no_run: run directory not found",
        "image": "file not found (manifest manifest.csv row 2)",
        "folds": "cannot fill 50 patient-grouped folds",
        "option": "--tasks: choose from cst,bcva,tn",
    }[what]
    assert expected in line
    assert not out.exists()


def test_help_documents_every_option():
    result = CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--manifest", "--runs", "--baseline", "--out", "--folds", "--modes", "--tasks", "--modalities",
        "--seed", "--finetune-epochs", "--finetune-modalities", "--finetune-scope", "--finetune-batch-size",
        "--finetune-lr", "--finetune-encoder-lr", "--fit-final", "--figures", "--device", "--threads",
        "--json",
    ):
        assert option in result.output, option


def test_fit_final_stores_heads_with_cv_metrics(tiny_cohort, tiny_run, tmp_path):
    from training.heads import load_heads

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # never write into the session fixture
    (run / "heads.json").unlink(missing_ok=True)
    result = _invoke(
        "--manifest", str(tiny_cohort / "manifest.csv"), "--runs", str(run), "--out", str(tmp_path / "ev"),
        "--modes", "probe", "--folds", "2", "--no-figures", "--fit-final", "--baseline", "none",
    )
    assert result.exit_code == 0, result.output
    heads = {h.task: h for h in load_heads(run)}
    assert set(heads) == set(TASKS)  # the default --tasks: every registry task, bcva_letters included
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results["sources"]) == {"clip"}
    rows = _manifest_rows(tiny_cohort / "manifest.csv")
    for task, head in heads.items():
        evaluation = head.metrics["evaluation"]
        assert evaluation["summary"] == results["cv"]["clip"]["probe"]["oct"][task]["summary"]
        column = TASKS[task].column
        assert head.n_train == evaluation["n_rows"] == sum(1 for r in rows if r[column] != "")
        assert head.input_modality == "oct"
        # the modality swap on the paired fundus embeddings travels with the head into the package
        swap = head.metrics["swap"]["fundus"]
        assert ("fundus" in head.metrics.get("cv_by_modality", {})) is swap["validated"]
