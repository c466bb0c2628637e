"""`retina evaluate`'s modality swap in both directions: the numbers are the fold heads applied to the
other modality's held-out rows, and results.md compares each swap with its own modality against the bar."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation.metrics import summarise
from training.evaluation.probe import REVERSE_SWAP_KEY, SWAP_KEY, cross_validate_probe
from training.heads import fit_linear_head


def _cohort(seed: int = 0, n_patients: int = 12, visits: int = 2, d: int = 5):
    rng = np.random.default_rng(seed)
    oct_ = rng.normal(size=(n_patients * visits, d))
    fundus = oct_ + 0.5 * rng.normal(size=oct_.shape)
    groups = np.repeat(np.arange(n_patients), visits)
    fold = groups % 3  # patient-grouped folds: one patient's visits in one fold
    return oct_, fundus, groups, fold


def test_both_swaps_are_the_fold_heads_on_the_other_modality():
    oct_, fundus, groups, fold = _cohort()
    y = 300 + 50 * oct_[:, 0] + np.random.default_rng(1).normal(scale=5, size=len(oct_))
    cv = cross_validate_probe("cst", "regression", {"oct": oct_, "fundus": fundus}, y, fold, seed=0,
                              groups=groups)
    assert list(cv) == ["oct", "fundus", SWAP_KEY, REVERSE_SWAP_KEY]
    for key, (fitted_on, applied_to) in {SWAP_KEY: (oct_, fundus), REVERSE_SWAP_KEY: (fundus, oct_)}.items():
        for k, entry in enumerate(cv[key]["folds"]):
            train, test = fold != k, fold == k
            head = fit_linear_head("cst", fitted_on[train], y[train], groups=groups[train])
            err = head.predict(applied_to[test]) - y[test]
            assert entry["fold"] == k and entry["n"] == int(test.sum())
            assert entry["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-9)
            assert entry["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-9)
    # one modality only: no swap rows
    assert list(cross_validate_probe("cst", "regression", {"oct": oct_}, y, fold, 0, ("oct",))) == ["oct"]


def _results(own_mae: list[float], swap_mae: list[float], own_auroc: list[float], swap_auroc: list[float]):
    def entry(values, metric, extra):
        folds = [{metric: v, **extra} for v in values]
        return {"folds": folds, "summary": summarise(folds)}

    cst = {"r2": 0.5, "n": 8}
    tn = {"n": 8}
    probe = {
        "oct": {"cst": entry(own_mae, "mae", cst), "tn": entry(own_auroc, "auroc", tn)},
        "fundus": {"cst": entry(own_mae, "mae", cst), "tn": entry(own_auroc, "auroc", tn)},
        SWAP_KEY: {"cst": entry(swap_mae, "mae", cst), "tn": entry(swap_auroc, "auroc", tn)},
        REVERSE_SWAP_KEY: {
            "cst": entry(swap_mae, "mae", {"r2": 0.05, "n": 8}), "tn": entry(own_auroc, "auroc", tn)
        },
    }
    return {
        "settings": {"tasks": ["cst", "tn"], "folds": 2},
        "cohort": {"rows": 16, "patients": 8},
        "sources": {"clip": {"label": "CLIP"}},
        "cv": {"clip": {"probe": probe}},
    }


def test_results_md_compares_each_swap_with_its_own_modality():
    from training.evaluation.report import results_markdown

    # fold means: own MAE 60, swap MAE 90 (1.50x, met); own AUROC 0.80, OCT head on fundus 0.74 (missed)
    text = results_markdown(_results([50.0, 70.0], [80.0, 100.0], [0.78, 0.82], [0.72, 0.76]))
    assert "| CLIP | linear probe | OCT head → fundus |" in text
    assert "| CLIP | linear probe | fundus head → OCT |" in text
    swap = text.split("## Modality swap")[1]
    rows = [line.removeprefix("| CLIP | ") for line in swap.splitlines() if line.startswith("| CLIP")]
    assert rows == [
        "OCT head → fundus | CST | MAE 90.0 ± 14.1, R² 0.500 ± 0.000 | MAE 60.0 ± 14.1 | 1.50x | met |",
        "OCT head → fundus | TN | AUROC 0.740 ± 0.028 | AUROC 0.800 ± 0.028 | 0.060 below | missed |",
        # the same MAE ratio, but R² 0.05 on OCT: below the floor of 0.1
        "fundus head → OCT | CST | MAE 90.0 ± 14.1, R² 0.050 ± 0.000 | MAE 60.0 ± 14.1 | 1.50x | missed |",
        "fundus head → OCT | TN | AUROC 0.800 ± 0.028 | AUROC 0.800 ± 0.028 | 0.000 below | met |",
    ]
    assert "MAE on other modality <= 1.5 x MAE on own modality and R² on other modality >= 0.1" in swap
