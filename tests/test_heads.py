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
