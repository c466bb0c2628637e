"""Honest predictions (issue 15, "Plausibility" and "Context with every prediction").

A regression head records its training label range; `retina predict` flags a value outside it (widened
by training.heads.PLAUSIBLE_MARGIN) in the table, JSON and CSV and never prints it as a bare number. A
head applied to another modality says "not validated on <modality>" unless the package records a
cross-validated result there. Every prediction carries the head's label meaning, threshold,
cross-validated quality and a reliability mark; `predict --help` and `models show` say research use.
Packages exported before the range was recorded (tests/fixtures/v0_1_0) still predict and say so.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_cli import run_cli as run
from fixtures_packages import make_toy_package

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

FROZEN = Path(__file__).parent / "fixtures" / "v0_1_0"
RESEARCH = "Predictions are for research use only, not for diagnosis or treatment decisions."


@pytest.fixture
def env(private_home, monkeypatch):
    """Private $RETINA_HOME, no store or default model, wide tables; the frozen source images
    (2 patients, one OCT folder and one fundus photo each) copied to tmp/src."""
    monkeypatch.setenv("RETINA_STORE", str(private_home / "store"))
    monkeypatch.setenv("COLUMNS", "250")
    shutil.copytree(FROZEN / "source", private_home / "src")
    return private_home


def _edit(package: Path, change) -> dict:
    """Apply `change(descriptor)` to retina.json (heads are not in `files`: no sha256 to refresh)."""
    descriptor = json.loads((package / "retina.json").read_text())
    change(descriptor)
    (package / "retina.json").write_text(json.dumps(descriptor, indent=2), encoding="utf-8")
    return descriptor


def _predict(package: Path, src: Path, *args: str):
    """(json payload, table stdout, csv rows) of one predict call in each output form."""
    code, out, err = run("predict", *args, src, "--model", package, "--json")
    assert code == 0, err
    payload = json.loads(out)
    code, table, err = run("predict", *args, src, "--model", package)
    assert code == 0, err
    code, text, err = run("predict", *args, src, "--model", package, "--csv")
    assert code == 0, err
    return payload, table, list(csv.DictReader(io.StringIO(text)))


def _table_line(table: str, path: str) -> str:
    (line,) = [ln for ln in table.splitlines() if path in ln]
    return line


def _field(shown: str, key: str) -> str:
    """A `models show` field as one line: its value wraps under its own column at the terminal width."""
    lines = shown.splitlines()
    (start,) = [i for i, ln in enumerate(lines) if ln.strip().startswith(f"{key} ")]
    head = lines[start]
    column = head.index(key) + len(key) + len(head[head.index(key) + len(key):]) \
        - len(head[head.index(key) + len(key):].lstrip())
    value = [head[column:].strip()]
    for line in lines[start + 1:]:
        if not line.strip() or line[:column].strip():
            break
        value.append(line.strip())
    return " ".join(value)


# --- the training range: fitting, export, descriptor checks -----------------------------------------


def test_regression_head_records_training_range_with_margin():
    from training.export import _head_entry
    from training.heads import PLAUSIBLE_MARGIN, LinearHead, fit_linear_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    y = np.linspace(180.0, 620.0, 40)
    y[5] = np.nan  # an unlabelled row does not count
    head = fit_linear_head("cst", x, y)
    assert PLAUSIBLE_MARGIN == 0.10
    assert head.training_range == pytest.approx(
        {"min": 180.0, "max": 620.0, "margin": 0.1, "low": 136.0, "high": 664.0})
    assert LinearHead.from_dict(head.to_dict()).training_range == head.training_range
    assert _head_entry(head)["training_range"] == head.training_range
    binary = fit_linear_head("tn", x, (x[:, 0] > 0).astype(float))
    assert binary.training_range is None and "training_range" not in _head_entry(binary)
    # heads.json written before the range was recorded still loads
    old = head.to_dict()
    del old["training_range"]
    assert LinearHead.from_dict(old).training_range is None


def test_descriptor_checks_the_training_range(tmp_path):
    from retinacli.descriptor_schema import descriptor_errors

    package = make_toy_package(tmp_path / "toy")
    good = json.loads((package / "retina.json").read_text())
    assert descriptor_errors(good) == []
    cst = good["heads"]["cst"]["training_range"]
    assert cst["low"] < cst["min"] < cst["max"] < cst["high"] and cst["margin"] == 0.1

    def errors_with(change):
        bad = json.loads(json.dumps(good))
        change(bad)
        return descriptor_errors(bad)

    swapped = errors_with(lambda d: d["heads"]["cst"]["training_range"].update(low=cst["max"] + 1))
    assert swapped == [f"heads.cst.training_range: must satisfy low <= min <= max <= high, got low "
                       f"{cst['max'] + 1!r}, min {cst['min']!r}, max {cst['max']!r}, high {cst['high']!r}"]
    assert errors_with(lambda d: d["heads"]["tn"].update(training_range=dict(cst))) == [
        "heads.tn.training_range: only regression heads have a training range, 'tn' is binary"]
    assert errors_with(lambda d: d["heads"]["cst"]["training_range"].update(high=math.inf)) == [
        "heads.cst.training_range.high: must be a finite number, got Infinity"]
    missing = errors_with(lambda d: d["heads"]["cst"]["training_range"].pop("low"))
    assert missing == ["heads.cst.training_range: missing required field 'heads.cst.training_range.low'"]


# --- plausibility -------------------------------------------------------------------------------------


def test_cst_outside_the_training_range_is_flagged_in_table_json_and_csv(env):
    package = make_toy_package(env / "toy")
    first, _, _ = _predict(package, env / "src", "--task", "cst")
    values = {p["path"]: p["value"] for p in first["predictions"]}
    assert len(values) == 2 and all(p["plausible"] is True for p in first["predictions"])
    (low_path, low), (high_path, high) = sorted(values.items(), key=lambda kv: kv[1])
    assert high - low > 0.05
    # A recorded range whose plausible low lies between the two values: one in, one out.
    lo = (low + high) / 2
    rng = {"min": lo + 1.0, "max": lo + 11.0, "margin": 0.1, "low": lo, "high": lo + 12.0}
    _edit(package, lambda d: d["heads"]["cst"].update(training_range=rng))
    payload, table, rows = _predict(package, env / "src", "--task", "cst")
    note = f"outside the training range {lo + 1:.1f} to {lo + 11:.1f} µm (±10 %)"
    by_path = {p["path"]: p for p in payload["predictions"]}
    assert by_path[low_path]["plausible"] is False and by_path[low_path]["note"] == note
    assert by_path[high_path]["plausible"] is True and by_path[high_path]["note"] == ""
    assert by_path[low_path]["value"] == pytest.approx(low, abs=1e-4)  # the number is kept, flagged
    assert payload["head"]["training_range"] == rng
    # table: the implausible value is marked and explained; the plausible one is not
    out_line, in_line = _table_line(table, low_path), _table_line(table, high_path)
    assert f"{low:.1f} (implausible)" in out_line and note in out_line
    assert f"{high:.1f}" in in_line and "implausible" not in in_line and "outside" not in in_line
    assert f"{low:.1f}" not in table.replace(f"{low:.1f} (implausible)", "")  # never bare
    assert f"within the training range {lo + 1:.1f} to {lo + 11:.1f} µm (±10 %)" in table
    csv_rows = {r["path"]: r for r in rows}
    assert (csv_rows[low_path]["plausible"], csv_rows[low_path]["note"]) == ("False", note)
    assert (csv_rows[high_path]["plausible"], csv_rows[high_path]["note"]) == ("True", "")


def test_old_package_without_a_range_still_predicts_and_says_so(env):
    package = env / "frozen_package"
    shutil.copytree(FROZEN / "package", package)
    assert "training_range" not in json.loads((package / "retina.json").read_text())["heads"]["cst"]
    payload, table, rows = _predict(package, env / "src", "--task", "cst")
    no_range = "no training range recorded in this package (values are not checked for plausibility)"
    assert len(payload["predictions"]) == 2
    assert all(p["plausible"] is None and p["note"] == no_range for p in payload["predictions"])
    assert payload["head"]["training_range"] is None
    assert no_range in table and "implausible" not in table
    assert [(r["plausible"], r["note"]) for r in rows] == [("", no_range)] * 2


def test_tiny_package_records_the_cohort_range_and_flags_fundus_cst(tiny_package, tiny_cohort_png, env):
    """The real probe + export path: the range is the cohort's cst labels; a cst head applied to fundus
    photos flags every value outside it and says "not validated on fundus", with the swap it measured."""
    descriptor = json.loads((tiny_package / "retina.json").read_text())
    for head in descriptor["heads"].values():  # retina probe (on OCT) records the swap on fundus
        swap = head["metrics"]["swap"]["fundus"]
        assert ("fundus" in head["metrics"].get("cv_by_modality", {})) is swap["validated"]
    cst_swap = descriptor["heads"]["cst"]["metrics"]["swap"]["fundus"]
    assert cst_swap["validated"] is False and cst_swap["ratio"] > 1.5
    with open(tiny_cohort_png / "manifest.csv", newline="") as handle:
        labels = [float(r["cst_um"]) for r in csv.DictReader(handle) if r.get("cst_um")]
    rng = descriptor["heads"]["cst"]["training_range"]
    width = max(labels) - min(labels)
    assert rng == pytest.approx({"min": min(labels), "max": max(labels), "margin": 0.1,
                                 "low": min(labels) - 0.1 * width, "high": max(labels) + 0.1 * width})
    payload, table, rows = _predict(tiny_package, tiny_cohort_png, "--task", "cst", "--modality", "fundus")
    preds = payload["predictions"]
    assert len(preds) >= 6 and all(p["modality"] == "fundus" for p in preds)
    for p in preds:
        inside = rng["low"] <= p["value"] <= rng["high"]
        assert p["plausible"] is inside and p["validated"] is False
        assert "not validated on fundus" in p["note"]
        assert ("outside the training range" in p["note"]) is (not inside)
        line = _table_line(table, p["path"])
        assert (f"{p['value']:.1f} (implausible)" in line) is (not inside)
    assert "not validated on fundus" in table
    assert f"{cst_swap['ratio']:.2f}x the MAE on oct; bar: MAE on fundus <= 1.5 x" in " ".join(table.split())
    assert all("not validated on fundus" in r["note"] and r["validated"] == "False" for r in rows)
    # measured: 16 of 16 fundus photos give a CST far below the range (-200 to 103 µm vs 225-569 µm)
    assert sum(p["plausible"] is False for p in preds) >= len(preds) / 2
    # the head's own modality on its training cohort: ridge predictions stay inside the range
    own = _predict(tiny_package, tiny_cohort_png, "--task", "cst")[0]["predictions"]
    assert len(own) >= 6 and all(p["plausible"] is True and p["note"] == "" for p in own)


# --- modality swap ------------------------------------------------------------------------------------


def test_modality_swap_says_not_validated_unless_the_package_records_it(env):
    package = make_toy_package(env / "toy")
    payload, table, rows = _predict(package, env / "src", "--task", "tn", "--modality", "fundus")
    note = "not validated on fundus (the head was fitted on oct embeddings)"
    assert len(payload["predictions"]) == 2
    assert all(p["validated"] is False and p["note"] == note for p in payload["predictions"])
    assert payload["head"]["validated"] is False and payload["head"]["applied_to"] == "fundus"
    assert "not validated on fundus: the head was fitted on oct embeddings" in table
    assert [(r["validated"], r["note"]) for r in rows] == [("False", note)] * 2
    # the head's own modality is validated
    own, own_table, _ = _predict(package, env / "src", "--task", "tn")
    assert all(p["validated"] is True and p["note"] == "" for p in own["predictions"])
    assert "not validated" not in own_table
    # a package that records a cross-validated fundus result for the head
    _edit(package, lambda d: d["heads"]["tn"]["metrics"].update(
        cv_by_modality={"fundus": {"auroc": 0.75, "folds": 5}}))
    swapped, swapped_table, swapped_rows = _predict(package, env / "src", "--task", "tn",
                                                    "--modality", "fundus")
    assert all(p["validated"] is True and p["note"] == "" for p in swapped["predictions"])
    assert swapped["head"]["cv_applied"] == {"auroc": 0.75, "folds": 5}
    assert "not validated" not in swapped_table + json.dumps(swapped) + str(swapped_rows)
    assert "applied to fundus (fitted on oct): cv AUROC 0.75 (5 folds)" in swapped_table


def _swap_metrics(fundus_noise: float | None) -> dict:
    """The toy tn head's metrics refitted with a modality swap on paired fundus rows: the OCT rows plus
    ``fundus_noise`` (None: unrelated rows)."""
    from fixtures_packages import TOY_DIM

    from training.heads import fit_linear_head

    rng = np.random.default_rng(21)
    x = rng.normal(size=(80, TOY_DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fundus = rng.normal(size=x.shape) if fundus_noise is None else x + fundus_noise * rng.normal(size=x.shape)
    y = (x[:, 1] + 0.2 * rng.normal(size=len(x)) > 0).astype(float)
    groups = np.repeat(np.arange(40), 2)
    head = fit_linear_head("tn", x, y, groups=groups, swap_embeddings={"fundus": fundus})
    return json.loads(json.dumps(head.to_dict()["metrics"]))


@pytest.mark.parametrize("fundus_noise", [0.01, None])
def test_predict_follows_the_swap_bar_recorded_by_the_head_fit(env, fundus_noise):
    """The real fitting path decides: a swap that meets the bar is validated on fundus (with its cv
    quality), one that misses it says "not validated" and shows what was measured and the bar."""
    from retinacli.headinfo import swap_text

    metrics = _swap_metrics(fundus_noise)
    swap = metrics["swap"]["fundus"]
    assert swap["validated"] is (fundus_noise is not None)  # near-identical rows pass, unrelated ones do not
    assert ("cv_by_modality" in metrics) is swap["validated"]
    package = make_toy_package(env / "toy")
    descriptor = _edit(package, lambda d: d["heads"]["tn"].update(metrics=metrics))
    payload, table, rows = _predict(package, env / "src", "--task", "tn", "--modality", "fundus")
    flat = " ".join(table.split())
    head = descriptor["heads"]["tn"]
    check = swap_text(head, "fundus")
    assert check == (f"cv AUROC {swap['auroc']:.2f} ({swap['folds']} folds), {abs(swap['auroc_drop']):.2f} "
                     f"{'below' if swap['auroc_drop'] >= 0 else 'above'} the AUROC on oct; bar: AUROC on "
                     "fundus >= 0.6 and at most 0.05 below the AUROC on oct")
    assert payload["head"]["swap_check"] == check
    assert all(p["validated"] is swap["validated"] for p in payload["predictions"])
    assert [r["validated"] for r in rows] == [str(swap["validated"])] * 2
    if swap["validated"]:
        assert payload["head"]["cv_applied"] == {"auroc": swap["auroc"], "folds": swap["folds"]}
        assert f"applied to fundus (fitted on oct): cv AUROC {swap['auroc']:.2f}" in flat
        assert "not validated" not in flat
    else:
        assert payload["head"]["cv_applied"] is None
        assert ("not validated on fundus: the head was fitted on oct embeddings and its cross-validated "
                f"fundus result misses the bar: {check}") in flat


# --- context and reliability --------------------------------------------------------------------------


def test_json_and_table_carry_label_meaning_threshold_and_cv_quality(env):
    package = make_toy_package(env / "toy")
    heads = json.loads((package / "retina.json").read_text())["heads"]
    tn, table, rows = _predict(package, env / "src", "--task", "tn")
    cv = heads["tn"]["metrics"]["cv"]
    assert tn["head"] == {
        "task": "tn", "kind": "binary", "input_modality": "oct", "applied_to": "oct", "validated": True,
        "cv_applied": None, "swap_check": None, "units": None, "label_meaning": "1 = high treatment need",
        "threshold": heads["tn"]["threshold"], "cv": {"auroc": cv["auroc"], "folds": cv["folds"]},
        "reliable": True, "reason": f"cross-validated AUROC {cv['auroc']:.2f} >= 0.6",
        "training_range": None, "research_use": RESEARCH}
    assert f"1 = high treatment need; label 1 when probability >= {heads['tn']['threshold']:.3f}" in table
    assert f"cv AUROC {cv['auroc']:.2f} ({cv['folds']} folds); reliable" in table
    assert RESEARCH in table
    assert all(r["label_meaning"] == "1 = high treatment need" and r["reliable"] == "True" for r in rows)
    cst, table, rows = _predict(package, env / "src", "--task", "cst")
    cv = heads["cst"]["metrics"]["cv"]
    assert cst["head"]["cv"] == {"mae": cv["mae"], "r2": cv["r2"], "folds": cv["folds"]}
    assert cst["head"]["label_meaning"] == heads["cst"]["label_meaning"] and cst["head"]["units"] == "µm"
    assert f"cv MAE {cv['mae']:.1f} µm, R² {cv['r2']:.2f} ({cv['folds']} folds)" in table
    assert heads["cst"]["label_meaning"] in table
    assert all(r["label_meaning"] == heads["cst"]["label_meaning"] for r in rows)


@pytest.mark.parametrize(("task", "change", "reason"), [
    ("tn", lambda m: m["cv"].update(auroc=0.55), "cross-validated AUROC 0.55 is below 0.6"),
    ("cst", lambda m: m["cv"].update(r2=0.05), "cross-validated R² 0.05 is below 0.1"),
    ("cst", lambda m: m["cv"].update(r2=None), "cross-validated R² is undefined"),
    ("tn", lambda m: m.pop("cv"), "no cross-validated result in the package"),
])
def test_heads_below_the_bars_are_marked_unreliable(env, task, change, reason):
    package = make_toy_package(env / "toy")
    _edit(package, lambda d: change(d["heads"][task]["metrics"]))
    payload, table, rows = _predict(package, env / "src", "--task", task)
    assert payload["head"]["reliable"] is False and payload["head"]["reason"] == reason
    assert f"UNRELIABLE: {reason}" in table
    assert [r["reliable"] for r in rows] == ["False"] * 2
    code, shown, _ = run("models", "show", package)
    assert code == 0 and f"UNRELIABLE: {reason}" in _field(shown, f"head {task}")


def test_reliability_bars_are_inclusive():
    from retinacli.headinfo import reliability

    assert reliability({"kind": "binary", "metrics": {"cv": {"auroc": 0.6}}})[0] is True
    assert reliability({"kind": "binary", "metrics": {"cv": {"auroc": 0.5999}}})[0] is False
    assert reliability({"kind": "regression", "metrics": {"cv": {"mae": 3.0, "r2": 0.1}}})[0] is True
    assert reliability({"kind": "regression", "metrics": {"cv": {"mae": 3.0, "r2": 0.0999}}})[0] is False


# --- research use -----------------------------------------------------------------------------------


def test_research_use_in_predict_help_and_models_show(env):
    package = make_toy_package(env / "toy")
    code, text, _ = run("predict", "--help")
    assert code == 0
    flat = " ".join(text.replace("│", " ").split())
    assert "research use only, not for diagnosis or treatment decisions" in flat
    code, shown, _ = run("models", "show", package)
    assert code == 0 and RESEARCH in shown
    heads = json.loads((package / "retina.json").read_text())["heads"]
    cv = heads["tn"]["metrics"]["cv"]
    assert f"reliable (cross-validated AUROC {cv['auroc']:.2f} >= 0.6)" in _field(shown, "head tn")
    rng = heads["cst"]["training_range"]
    assert f"training range {rng['min']:.1f} to {rng['max']:.1f} µm (±10 %)" in _field(shown, "head cst")
