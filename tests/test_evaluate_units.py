"""Evaluation building blocks without models: folds, metrics, retrieval ranks, report formatting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retinacli.ranking import cosine_scores, match_ranks
from training.evaluation.folds import (
    FoldError,
    assign_folds,
    patient_folds,
    read_folds_csv,
    write_folds_csv,
)
from training.evaluation.metrics import binary_metrics, regression_metrics, summarise
from training.evaluation.report import format_cell, write_json
from training.evaluation.retrieval import evaluate_retrieval, top_matches


def _cohort_rows(n_patients: int = 20, seed: int = 0):
    """Patients with 1-6 rows each, labels correlated within a patient (as real visits are)."""
    rng = np.random.default_rng(seed)
    ids, cst, binary = [], [], []
    for p in range(n_patients):
        k = int(rng.integers(1, 7))
        ids += [f"p{p:03d}"] * k
        cst += list(rng.normal(300 + 20 * p, 10, k))
        binary += [int(p % 3 == 0)] * k
    return np.array(ids), np.array(cst), np.array(binary)


@pytest.mark.parametrize("kind", ["regression", "binary"])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_folds_group_every_patient_into_exactly_one_fold(kind, seed, tmp_path):
    ids, cst, binary = _cohort_rows(seed=seed)
    labels = cst if kind == "regression" else binary
    fold = assign_folds(ids, labels, kind, n_folds=5, seed=seed)
    assert sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    mapping = patient_folds(ids, fold)  # raises if any patient sits in two folds
    assert len(mapping) == len(np.unique(ids))
    for pid in np.unique(ids):
        assert len(set(fold[ids == pid])) == 1
    if kind == "binary":  # stratified: every fold sees both classes (7 positive patients, 5 folds)
        assert all(len(set(binary[fold == k])) == 2 for k in range(5))
    # folds.csv round trip: one row per patient, the fold it was assigned
    write_folds_csv(tmp_path / "folds.csv", {"task": mapping})
    back = read_folds_csv(tmp_path / "folds.csv")
    assert back == {"task": mapping}
    rows = (tmp_path / "folds.csv").read_text().splitlines()
    assert rows[0] == "patient_id,task_fold" and len(rows) == 1 + len(mapping)


def test_folds_are_seeded_and_reject_impossible_splits():
    ids, cst, _ = _cohort_rows()
    a = assign_folds(ids, cst, "regression", 5, seed=3)
    assert np.array_equal(a, assign_folds(ids, cst, "regression", 5, seed=3))
    assert not np.array_equal(a, assign_folds(ids, cst, "regression", 5, seed=4))
    with pytest.raises(FoldError, match="cannot fill 5"):
        assign_folds(np.array(["a", "a", "b", "c"]), np.arange(4.0), "regression", 5, 0)
    with pytest.raises(FoldError, match="single class"):
        assign_folds(np.array(["a", "b", "c"]), np.zeros(3), "binary", 2, 0)
    with pytest.raises(FoldError, match="patient x is in folds"):
        patient_folds(np.array(["x", "x"]), np.array([0, 1]))


def test_regression_metrics_match_hand_computation():
    y = np.array([200.0, 300.0, 400.0, 500.0])
    pred = np.array([210.0, 290.0, 430.0, 500.0])
    m = regression_metrics(y, pred)
    assert m["mae"] == pytest.approx(12.5)
    assert m["rmse"] == pytest.approx(np.sqrt((100 + 100 + 900) / 4))
    assert m["r2"] == pytest.approx(1 - 1100 / 50000)
    assert m["n"] == 4


def test_binary_metrics_and_threshold():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.3, 0.6, 0.4, 0.8, 0.9])
    m = binary_metrics(y, p, threshold=0.5)
    assert m["auroc"] == pytest.approx(8 / 9)  # one discordant pair of nine
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert binary_metrics(y, p, threshold=0.35)["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    one_class = binary_metrics(np.array([1, 1]), np.array([0.2, 0.9]), 0.5)
    assert one_class["auroc"] is None and one_class["auprc"] is None


def test_summary_is_mean_and_sample_sd_skipping_nulls():
    folds = [
        {"mae": 10.0, "r2": None, "n": 3},
        {"mae": 20.0, "r2": 0.5, "n": 4},
        {"mae": 30.0, "r2": 0.7, "n": 5},
    ]
    s = summarise(folds)
    assert s["mae"] == {"mean": 20.0, "sd": 10.0, "n_folds": 3}
    assert s["r2"]["mean"] == pytest.approx(0.6) and s["r2"]["n_folds"] == 2
    assert "n" not in s
    assert format_cell(s, "mae") == "20.0 ± 10.0"
    assert format_cell(s, "r2") == "0.600 ± 0.141"
    assert format_cell({}, "auroc") == "–"


def test_retrieval_ranks_pool_and_chance():
    rng = np.random.default_rng(0)
    oct_ = rng.normal(size=(10, 8))
    oct_ /= np.linalg.norm(oct_, axis=1, keepdims=True)
    fundus = oct_.copy()
    fundus[[0, 1]] = fundus[[1, 0]]  # queries 0 and 1 now point at each other's pair
    ranks = match_ranks(cosine_scores(fundus, oct_))
    assert ranks[2:].tolist() == [1] * 8 and ranks[0] > 1 and ranks[1] > 1
    r = evaluate_retrieval(fundus, oct_, ks=(1, 5))
    assert r["pool_size"] == 10
    d = r["fundus_to_oct"]
    assert d["top1"] == pytest.approx(0.8)
    assert d["chance_top1"] == pytest.approx(0.1) and d["chance_top5"] == pytest.approx(0.5)
    assert d["chance_median_rank"] == pytest.approx(5.5)
    order, scores = top_matches(oct_, oct_, 3)
    assert order[:, 0].tolist() == list(range(10)) and np.allclose(scores[:, 0], 1.0)


def test_results_json_is_stable_text(tmp_path):
    payload = {"b": float("nan"), "a": [np.float64(0.1), np.int64(3)], "c": 1 / 3}
    write_json(tmp_path / "r.json", payload)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"a": [0.1, 3], "b": None, "c": 0.3333333333}
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')


def _swapped_within_eyes():
    """10 visits of 5 eyes (2 visits each); every fundus photo is the embedding of its eye's *other* visit."""
    oct_ = np.eye(10)
    fundus = oct_[[1, 0, 3, 2, 5, 4, 7, 6, 9, 8]]
    eyes = [(f"p{i // 4}", "OD" if i // 2 % 2 == 0 else "OS") for i in range(10)]
    return fundus, oct_, eyes


def test_retrieval_eye_level_counts_any_visit_of_the_eye():
    fundus, oct_, eyes = _swapped_within_eyes()
    r = evaluate_retrieval(fundus, oct_, ks=(1, 5), eyes=eyes)
    assert r["eye_level"]["eyes"] == 5
    visit, eye = r["fundus_to_oct"], r["eye_level"]["fundus_to_oct"]
    # visit level: own OCT scores 0 like the 8 other-eye volumes, behind the same-eye one -> rank 10
    assert visit["top1"] == 0.0 and visit["median_rank"] == 10.0
    assert visit["chance_top1"] == pytest.approx(0.1)
    assert eye["top1"] == 1.0 and eye["mrr"] == 1.0
    assert eye["chance_top1"] == pytest.approx(2 / 10)  # 2 visits of the query's eye in a pool of 10
    assert eye["chance_top5"] == pytest.approx(1 - 28 / 126)  # 1 - C(8, 5) / C(10, 5)
    assert eye["chance_median_rank"] == pytest.approx(11 / 3)  # (pool + 1) / (m + 1)
    assert "eye_level" not in evaluate_retrieval(fundus, oct_, ks=(1, 5))


def test_results_md_shows_visit_and_eye_level_both_directions():
    from training.evaluation.report import _retrieval_table

    fundus, oct_, eyes = _swapped_within_eyes()
    r = evaluate_retrieval(fundus, oct_, ks=(1, 5), eyes=eyes)
    results = {"settings": {"retrieval_k": [1, 5]}, "sources": {"clip": {"label": "CLIP"}},
               "retrieval": {"clip": r}}
    table = _retrieval_table(results)
    assert "| encoder | direction | pool (visits) | eyes | top-1 (chance) | top-5 (chance) | MRR |" in table
    assert "| encoder | direction | pool (visits) | eyes | hit@1 (chance) | hit@5 (chance) | MRR |" in table
    visit_rows, eye_rows = table.split("### Eye level")
    assert "| CLIP | fundus → OCT | 10 | 5 | 0.000 (0.100) | 0.000 (0.500) | 0.100 | 10.0 (5.5) |" \
        in visit_rows
    assert "| CLIP | OCT → fundus | 10 | 5 | 0.000 (0.100)" in visit_rows
    assert "| CLIP | fundus → OCT | 10 | 5 | 1.000 (0.200) | 1.000 (0.778) | 1.000 | 1.0 (3.7) |" in eye_rows
    assert "| CLIP | OCT → fundus | 10 | 5 | 1.000 (0.200)" in eye_rows
    # a results.json written before eye-level metrics renders its visit-level table alone
    del r["eye_level"]
    old = _retrieval_table(results)
    assert "### Visit level" in old and "Eye level" not in old and "| CLIP | fundus → OCT | 10 | – |" in old
