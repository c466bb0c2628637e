"""Task heads: fit_linear_head recovers known linear relations; binary heads are calibrated to [0, 1]."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.heads import LinearHead, fit_linear_head, load_heads, save_heads, youden_threshold


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cst_head_recovers_linear_relation_in_micrometres():
    rng = np.random.default_rng(0)
    x = _unit_rows(rng, 300, 8)
    true_w = np.array([120.0, -80.0, 40.0, 0.0, 0.0, 60.0, -20.0, 10.0])
    y = 300.0 + x @ true_w + rng.normal(scale=1.0, size=300)
    head = fit_linear_head("cst", x, y, seed=0)
    assert head.kind == "regression" and head.units == "µm" and head.threshold is None
    assert head.n_train == 300
    np.testing.assert_allclose(head.weight, true_w, atol=2.0)
    assert abs(head.bias - 300.0) < 1.0
    assert head.metrics["train"]["mae"] < 1.2
    assert head.metrics["cv"]["r2"] > 0.99
    assert head.metrics["cv"]["mae"] < 1.5
    np.testing.assert_allclose(head.predict(x), x @ head.weight + head.bias)


def test_binary_head_probabilities_and_threshold():
    rng = np.random.default_rng(1)
    x = _unit_rows(rng, 400, 6)
    direction = np.array([1.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    logits = 12.0 * (x @ direction) - 0.5
    y = (rng.random(400) < 1 / (1 + np.exp(-logits))).astype(float)
    head = fit_linear_head("bcva", x, y, seed=0)
    assert head.kind == "binary" and head.units is None
    assert "70 ETDRS letters" in head.label_meaning
    prob = head.predict(x)
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    # the fitted direction is the true one (up to scale)
    cos = head.weight @ direction / (np.linalg.norm(head.weight) * np.linalg.norm(direction))
    assert cos > 0.95
    assert 0.0 < head.threshold < 1.0
    assert head.metrics["threshold_source"] == "youden_j_out_of_fold"
    assert head.metrics["cv"]["auroc"] > 0.85
    assert head.metrics["train"]["balanced_accuracy"] > 0.75


def test_binary_head_ignores_unlabelled_rows_and_uses_groups():
    rng = np.random.default_rng(2)
    x = _unit_rows(rng, 60, 4)
    y = (x[:, 0] > 0).astype(float)
    y[::7] = np.nan
    groups = np.repeat(np.arange(20), 3)
    head = fit_linear_head("tn", x, y, seed=0, groups=groups)
    assert head.n_train == int(np.isfinite(y).sum())
    assert head.metrics["cv"]["grouped"] is True
    assert head.metrics["cv"]["auroc"] > 0.9


def test_youden_threshold_separates_perfectly_separable_scores():
    y = np.array([0, 0, 0, 1, 1, 1])
    prob = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = youden_threshold(y, prob)
    assert 0.3 < t <= 0.6
    assert np.array_equal((prob >= t).astype(int), y)


def test_bad_inputs_are_refused_with_reasons():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="unknown task"):
        fit_linear_head("iop", x, np.zeros(5))
    with pytest.raises(ValueError, match="single class"):
        fit_linear_head("tn", x, np.zeros(5))
    with pytest.raises(ValueError, match="0 or 1"):
        fit_linear_head("tn", x, np.arange(5.0))


def test_heads_round_trip_through_heads_json(tmp_path):
    rng = np.random.default_rng(3)
    x = _unit_rows(rng, 40, 4)
    cst = fit_linear_head("cst", x, 250 + 50 * x[:, 0])
    tn = fit_linear_head("tn", x, (x[:, 1] > 0).astype(float))
    save_heads(tmp_path, [cst])
    save_heads(tmp_path, [tn])  # adds tn, keeps cst
    loaded = {h.task: h for h in load_heads(tmp_path)}
    assert set(loaded) == {"cst", "tn"}
    np.testing.assert_allclose(loaded["cst"].predict(x), cst.predict(x))
    np.testing.assert_allclose(loaded["tn"].predict(x), tn.predict(x))
    assert loaded["tn"].threshold == pytest.approx(tn.threshold)
    payload = json.loads((tmp_path / "heads.json").read_text())
    assert payload["schema_version"] == 1
    assert LinearHead.from_dict(payload["heads"][0]).task == "cst"


def test_save_heads_records_the_checkpoint_they_were_fitted_on(tmp_path):
    import hashlib

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"weights v1")
    rng = np.random.default_rng(4)
    x = _unit_rows(rng, 30, 4)
    save_heads(tmp_path, [fit_linear_head("cst", x, 250 + 50 * x[:, 0])])
    (head,) = load_heads(tmp_path)
    assert head.checkpoint_sha256 == hashlib.sha256(b"weights v1").hexdigest()


# --- modality swap (issue 21) -----------------------------------------------------------------------


def _paired(seed: int, n_patients: int = 30, visits: int = 2, d: int = 6, fundus_noise: float = 0.01):
    """OCT rows, paired fundus rows (the OCT row plus noise), patient groups."""
    rng = np.random.default_rng(seed)
    x = _unit_rows(rng, n_patients * visits, d)
    fundus = x + fundus_noise * rng.normal(size=x.shape)
    return x, fundus, np.repeat(np.arange(n_patients), visits)


def test_regression_swap_is_the_out_of_fold_head_applied_to_the_paired_rows():
    from sklearn.model_selection import GroupKFold

    x, fundus, groups = _paired(5)
    y = 300.0 + 80.0 * x[:, 0] - 40.0 * x[:, 2] + np.random.default_rng(6).normal(scale=4.0, size=len(x))
    head = fit_linear_head("cst", x, y, groups=groups, swap_embeddings={"fundus": fundus, "oct": x})
    # by hand: each fold's head (the same fit on the training fold) applied to the held-out fundus rows
    oof = np.empty_like(y)
    for tr, te in GroupKFold(n_splits=5).split(x, y, groups):
        oof[te] = fit_linear_head("cst", x[tr], y[tr]).predict(fundus[te])
    swap = head.metrics["swap"]["fundus"]
    assert set(head.metrics["swap"]) == {"fundus"}  # the head's own modality is no swap
    assert swap["mae"] == pytest.approx(np.mean(np.abs(oof - y)), rel=1e-9)
    assert swap["rmse"] == pytest.approx(np.sqrt(np.mean((oof - y) ** 2)), rel=1e-9)
    assert swap["r2"] == pytest.approx(1 - np.sum((oof - y) ** 2) / np.sum((y - y.mean()) ** 2), rel=1e-9)
    assert (swap["folds"], swap["grouped"]) == (5, True)
    assert swap["own_mae"] == head.metrics["cv"]["mae"]
    assert swap["ratio"] == pytest.approx(swap["mae"] / head.metrics["cv"]["mae"], rel=1e-12)
    # near-identical fundus rows: within 1.5x and R² >= 0.1 -> recorded for `retina predict`
    assert swap["ratio"] < 1.5 and swap["r2"] > 0.1 and swap["validated"] is True
    assert swap["criterion"] == "MAE on fundus <= 1.5 x MAE on oct and R² on fundus >= 0.1"
    assert head.metrics["cv_by_modality"] == {
        "fundus": {k: swap[k] for k in ("mae", "rmse", "r2", "folds", "grouped")}
    }


def test_swap_that_misses_the_bar_is_recorded_but_not_validated():
    x, _, groups = _paired(7)
    unrelated = _unit_rows(np.random.default_rng(8), len(x), x.shape[1])
    y = 300.0 + 80.0 * x[:, 0] + np.random.default_rng(9).normal(scale=4.0, size=len(x))
    head = fit_linear_head("cst", x, y, groups=groups, input_modality="oct",
                           swap_embeddings={"fundus": unrelated})
    swap = head.metrics["swap"]["fundus"]
    assert swap["ratio"] > 1.5 and swap["validated"] is False
    assert "cv_by_modality" not in head.metrics
    # no swap embeddings: no swap keys (heads fitted as before)
    plain = fit_linear_head("cst", x, y, groups=groups)
    assert "swap" not in plain.metrics and "cv_by_modality" not in plain.metrics
    assert plain.metrics["cv"] == head.metrics["cv"]
    with pytest.raises(ValueError, match="not paired"):
        fit_linear_head("cst", x, y, swap_embeddings={"fundus": unrelated[:-1]})


def test_binary_swap_uses_the_same_folds_and_the_heads_threshold():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    from training.heads import _sigmoid

    x, fundus, groups = _paired(10, n_patients=40, fundus_noise=0.3)
    y = (x[:, 0] + 0.3 * np.random.default_rng(11).normal(size=len(x)) > 0).astype(float)
    head = fit_linear_head("tn", fundus, y, seed=3, groups=groups, input_modality="fundus",
                           swap_embeddings={"oct": x})
    assert head.input_modality == "fundus" and set(head.metrics["swap"]) == {"oct"}
    prob = np.empty_like(y)
    splitter = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=3)
    for tr, te in splitter.split(fundus, y.astype(int), groups):
        fold_head = fit_linear_head("tn", fundus[tr], y[tr], seed=3)
        prob[te] = _sigmoid(x[te] @ fold_head.weight + fold_head.bias)
    swap = head.metrics["swap"]["oct"]
    assert swap["auroc"] == pytest.approx(roc_auc_score(y, prob), rel=1e-9)
    expected_bacc = balanced_accuracy_score(y.astype(int), (prob >= head.threshold).astype(int))
    assert swap["balanced_accuracy"] == pytest.approx(expected_bacc)
    assert swap["auroc_drop"] == pytest.approx(head.metrics["cv"]["auroc"] - swap["auroc"], abs=1e-12)
    own, other = head.metrics["cv"]["auroc"], swap["auroc"]
    assert swap["validated"] is (other >= 0.6 and own - other <= 0.05 + 1e-9)
    assert ("oct" in head.metrics.get("cv_by_modality", {})) is swap["validated"]


@pytest.mark.parametrize(
    ("kind", "own", "other", "validated"),
    [
        ("regression", {"mae": 60.0}, {"mae": 90.0, "r2": 0.2}, True),  # exactly 1.5x: met
        ("regression", {"mae": 60.0}, {"mae": 90.6, "r2": 0.2}, False),  # 1.51x
        ("regression", {"mae": 60.0}, {"mae": 61.0, "r2": 0.05}, False),  # close, but explains nothing
        ("regression", {"mae": 60.0}, {"mae": 61.0, "r2": None}, False),
        ("binary", {"auroc": 0.80}, {"auroc": 0.75}, True),  # exactly 0.05 below: met
        ("binary", {"auroc": 0.80}, {"auroc": 0.74}, False),
        ("binary", {"auroc": 0.62}, {"auroc": 0.59}, False),  # close, but below AUROC 0.6
        ("binary", {"auroc": 0.70}, {"auroc": 0.72}, True),  # better on the other modality
        ("binary", {"auroc": 0.80}, {"auroc": None}, False),  # one class only: undefined
    ],
)
def test_swap_bar(kind, own, other, validated):
    from retinacli.headinfo import swap_verdict

    verdict = swap_verdict(kind, own, other, "oct", "fundus")
    assert verdict["validated"] is validated
    if kind == "regression":
        assert verdict["ratio"] == pytest.approx(other["mae"] / own["mae"])
    elif other["auroc"] is not None:
        assert verdict["auroc_drop"] == pytest.approx(own["auroc"] - other["auroc"])
