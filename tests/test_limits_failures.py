"""Issue 14, "a failure leaves nothing behind that blocks the retry" and "inputs are never silently
skipped" (the folder part): failed commands leave no half-made run folder, empty store or partial
evaluation output; the retry after fixing the cause succeeds without --overwrite; an unusable task is
skipped with its reason; library warnings are one `warning:` line; retina's own output folders met
during discovery are listed under `ignored` with the reason (docs/reliability.md "Limits: failures
and exit codes")."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinacli.cli import app

FROZEN = Path(__file__).parent / "fixtures" / "v0_1_0"
RAW_WARNING = re.compile(r"\.py:\d+: \w*Warning")  # Python's own "file.py:12: UserWarning: ..." format


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path: Path, rows: list[dict[str, str]], base: Path) -> Path:
    """A manifest at `path` whose file paths point into `base` (absolute, so it can live anywhere)."""
    fixed = [{**r, "oct_path": str(base / r["oct_path"]), "fundus_path": str(base / r["fundus_path"])}
             for r in rows]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(fixed)
    return path


# --- train --------------------------------------------------------------------------------------


def test_failed_train_leaves_no_run_folder_and_the_retry_needs_no_flag(noise_cohort, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    common = ["--out", out, "--preset", "tiny", "--epochs", "1", "--threads", "2"]
    # 1. cheap check: weights named that are not there -> 2 before any folder is made
    missing = cli("train", "--manifest", noise_cohort, *common, "--fundus-init", tmp_path / "nope.pt")
    assert missing.exit_code == 2 and "nope.pt" in missing.output, missing.output
    assert not out.exists()
    # 2. a failure after the run folder was made (one patient: none to validate on) -> nothing kept
    one = _write_rows(tmp_path / "one.csv", _rows(noise_cohort)[:2], noise_cohort.parent)
    failed = cli("train", "--manifest", one, *common)
    assert failed.exit_code == 1 and "need at least 2 patients" in failed.output, failed.output
    assert not out.exists()
    # 3. in a folder the user made, only what the run wrote is removed
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    again = cli("train", "--manifest", one, "--out", mine, "--preset", "tiny", "--epochs", "1")
    assert again.exit_code == 1
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # 4. the same command, cause fixed: no --resume / --overwrite needed
    ok = cli("train", "--manifest", noise_cohort, *common)
    assert ok.exit_code == 0, ok.output
    assert (out / "config.json").is_file() and (out / "checkpoints" / "last.pt").is_file()


# --- evaluate -----------------------------------------------------------------------------------


def _cohort_with(tiny_cohort: Path, tmp_path: Path, **columns: str) -> Path:
    rows = _rows(tiny_cohort / "manifest.csv")
    for row in rows:
        row.update(columns)
    return _write_rows(tmp_path / "labels.csv", rows, tiny_cohort)


def test_evaluate_skips_a_task_lacking_one_class_and_completes_the_others(tiny_cohort, tiny_run,
                                                                          tmp_path):
    pytest.importorskip("torch")
    manifest = _cohort_with(tiny_cohort, tmp_path, tn_label="0")  # tn: every row negative
    out = tmp_path / "ev"
    result = cli("evaluate", "--manifest", manifest, "--runs", tiny_run, "--out", out, "--tasks", "cst,tn",
                 "--modes", "probe", "--folds", "2", "--no-figures", "--baseline", "none")
    assert result.exit_code == 0, result.output
    assert "skipped task tn: the label has a single class" in result.stderr
    results = json.loads((out / "results.json").read_text())
    assert any(s.startswith("task tn: the label has a single class") for s in results["skipped"])
    by_task = results["cv"]["clip"]["probe"]["oct"]
    assert "cst" in by_task and "tn" not in by_task
    assert "tn_fold" not in (out / "folds.csv").read_text().splitlines()[0]
    # only unusable tasks: one line, exit 2, nothing written
    alone = cli("evaluate", "--manifest", manifest, "--runs", tiny_run, "--out", tmp_path / "ev2",
                "--tasks", "tn", "--modes", "probe", "--folds", "2", "--no-figures")
    assert alone.exit_code == 2
    assert "no task can be evaluated (tn: the label has a single class" in alone.output
    assert not (tmp_path / "ev2").exists()


def test_evaluate_skips_a_binary_task_with_too_few_positives_for_the_folds(tiny_cohort, tiny_run, tmp_path):
    pytest.importorskip("torch")
    rows = _rows(tiny_cohort / "manifest.csv")
    for index, row in enumerate(rows):
        row["tn_label"] = "1" if index == 0 else "0"  # one positive row cannot be in 2 test folds
    manifest = _write_rows(tmp_path / "few.csv", rows, tiny_cohort)
    result = cli("evaluate", "--manifest", manifest, "--runs", tiny_run, "--out", tmp_path / "ev",
                 "--tasks", "cst,tn", "--modes", "probe", "--folds", "2", "--no-figures",
                 "--baseline", "none")
    assert result.exit_code == 0, result.output
    assert re.search(r"skipped task tn: fold \d has no positive row \(1 positive", result.stderr)


def test_failed_evaluate_leaves_no_partial_output_and_the_retry_works(tiny_cohort, tiny_run, tmp_path,
                                                                      monkeypatch):
    pytest.importorskip("torch")
    from training.evaluation import protocol

    def broken(*_args, **_kwargs):
        raise RuntimeError("planted failure after folds.csv")

    out = tmp_path / "ev"
    args = ["evaluate", "--manifest", tiny_cohort / "manifest.csv", "--runs", tiny_run, "--out", out,
            "--tasks", "cst", "--modes", "probe", "--folds", "2", "--no-figures", "--baseline", "none"]
    with monkeypatch.context() as patch:
        patch.setattr(protocol, "_run_retrieval", broken)
        failed = cli(*args)
    assert failed.exit_code == 1 and "planted failure after folds.csv" in failed.output
    assert not out.exists()  # no folds.csv / results.md left to be taken for results
    ok = cli(*args)
    assert ok.exit_code == 0, ok.output
    assert {"folds.csv", "results.json", "results.md"} <= {p.name for p in out.iterdir()}


# --- embed --------------------------------------------------------------------------------------


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RETINA_STORE", raising=False)
    monkeypatch.delenv("RETINA_MODEL", raising=False)
    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "home"))
    shutil.copytree(FROZEN / "package", tmp_path / "toy")
    shutil.copytree(FROZEN / "source", tmp_path / "data")
    (tmp_path / "notpkg").mkdir()
    return tmp_path


def test_embed_with_an_invalid_package_creates_no_store(scratch):
    result = cli("embed", "data", "--model", "notpkg", "--store", "st")
    assert result.exit_code == 3 and "notpkg" in result.stderr
    assert not (scratch / "st").exists()
    ok = cli("embed", "data", "--model", "toy", "--store", "st", "--workers", "1")  # cause fixed
    assert ok.exit_code == 0, ok.output
    assert json.loads((scratch / "st" / "store.json").read_text())["rows"] == 4


def test_embed_that_commits_nothing_leaves_no_store_and_the_retry_works(scratch):
    (scratch / "bad").mkdir()
    (scratch / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    made_by_user = scratch / "user_store"
    made_by_user.mkdir()  # a folder the user named: kept, with only what was in it
    (made_by_user / "README.txt").write_text("embeddings go here")
    for store, left in (("st", None), ("user_store", ["README.txt"])):
        result = cli("embed", "bad", "--model", "toy", "--store", store, "--workers", "1")
        assert result.exit_code == 1
        assert "broken.png" in result.stderr and "was not created" in result.stderr
        if left is None:
            assert not (scratch / store).exists()
        else:
            assert sorted(p.name for p in (scratch / store).iterdir()) == left
    # A retry with another package is not refused by a store the failed run pinned to its model.
    other = scratch / "other"
    from fixtures_packages import make_toy_package

    make_toy_package(other, name="other", seed=3)
    ok = cli("embed", "data", "--model", other, "--store", "st", "--workers", "1")
    assert ok.exit_code == 0, ok.output
    assert json.loads((scratch / "st" / "store.json").read_text())["model_name"] == "other"


def test_embed_failing_before_its_first_shard_leaves_no_store(scratch, monkeypatch):
    from retinacli import pipeline

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "run_embedding", full_disk)
        failed = cli("embed", "data", "--model", "toy", "--store", "st", "--workers", "1")
    assert failed.exit_code == 1 and "No space left on device" in failed.stderr
    assert not (scratch / "st").exists()
    ok = cli("embed", "data", "--model", "toy", "--store", "st", "--workers", "1")
    assert ok.exit_code == 0, ok.output


# --- warnings -----------------------------------------------------------------------------------


def test_library_warnings_are_one_line_each_never_raw(scratch, monkeypatch):
    import logging
    import warnings

    import numpy as np

    from retinacli.commands import inspect as inspect_command

    real = inspect_command.inspect_paths

    def noisy(*args, **kwargs):
        from sklearn.linear_model import LogisticRegression

        x = np.random.default_rng(0).normal(size=(40, 5))
        y = (x[:, 0] > 0).astype(int)
        for _ in range(2):  # the same warning twice: shown once
            LogisticRegression(max_iter=1).fit(x, y)  # a real ConvergenceWarning
            with np.errstate(divide="warn"):
                np.log(np.zeros(1))  # a real numpy RuntimeWarning
        warnings.warn("multi\nline message", UserWarning, stacklevel=1)
        warnings.warn("op does not have a deterministic implementation", UserWarning, stacklevel=1)
        logging.getLogger("faiss.loader").warning("could not load AVX2 library")
        return real(*args, **kwargs)

    monkeypatch.setattr(inspect_command, "inspect_paths", noisy)
    result = CliRunner().invoke(app, ["inspect", "data"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert not [line for line in lines if RAW_WARNING.search(line)], result.stderr
    convergence = [line for line in lines if line.startswith("warning: scikit-learn:")]
    assert len(convergence) == 1 and "lbfgs failed to converge" in convergence[0].lower()
    assert len([line for line in lines if line.startswith("warning: numpy: divide by zero")]) == 1
    assert "warning: faiss: could not load AVX2 library" in lines
    assert any(line.startswith("warning: ") and line.endswith("multi line message") for line in lines)
    assert "deterministic implementation" not in result.stderr  # silenced: nothing to act on
    assert all(line.startswith("warning: ") for line in lines if "Warning" in line)


# --- discovery ----------------------------------------------------------------------------------


def _plant_outputs(root: Path) -> dict[str, str]:
    """retina's own output folders inside a data folder -> the words their reason must contain."""
    (root / "mystore").mkdir()
    (root / "mystore" / "store.json").write_text("{}")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "retina.json").write_text("{}")
    (root / "myrun").mkdir()
    (root / "myrun" / "preprocess.json").write_text("{}")
    (root / "oldrun" / "checkpoints").mkdir(parents=True)
    for folder in ("mystore", "mypkg", "myrun", "oldrun"):  # each holds an image that is not read
        shutil.copy(FROZEN / "source" / "p8fd3ea9ca936" / "OS_v00_fundus.png", root / folder / "x.png")
    return {"mystore": "embedding store (has store.json)", "mypkg": "model package (has retina.json)",
            "myrun": "training run (has preprocess.json)",
            "oldrun": "training run (has a checkpoints folder)"}


def test_discovery_lists_store_package_and_run_folders_as_ignored(scratch):
    expected = _plant_outputs(scratch / "data")
    result = cli("inspect", "data", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    reasons = {Path(r["path"]).name: r["reason"] for r in payload["ignored_files"]}
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons)
    assert not [item for item in payload["items"] if Path(item["path"]).name == "x.png"]
    human = cli("inspect", "data")
    for name, words in expected.items():
        assert re.search(rf"ignored folder \S*{name}: .*{re.escape(words)}", human.stderr), human.stderr
    named = cli("inspect", "data/mystore", "--json")  # named on the command line: same reason
    assert json.loads(named.stdout)["ignored_files"][0]["reason"].startswith("an embedding store")
    embedded = cli("embed", "data", "--model", "toy", "--store", "st", "--workers", "1", "--json")
    assert embedded.exit_code == 0, embedded.output
    summary = json.loads(embedded.stdout)
    ignored = {Path(r["path"]).name: r["reason"] for r in summary["ignored"]}
    for name, words in expected.items():
        assert words in ignored[name]
        assert f"ignored folder data/{name}:" in embedded.stderr
    assert summary["embedded"] == 4  # the source cohort only, nothing from the planted folders
