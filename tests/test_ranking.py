"""retinacli.ranking: hand-computed ranks, ties, chance levels, the one result schema."""

from __future__ import annotations

import numpy as np
import pytest

from retinacli.ranking import (
    both_directions,
    chance_top_k,
    match_ranks,
    paired_metrics,
    rank_metrics,
    top_k_indices,
    top_k_overlap,
)


def test_ranks_of_paired_scores_by_hand():
    scores = np.array([
        [0.9, 0.1, 0.2],  # own 0.9 is best -> 1
        [0.5, 0.4, 0.3],  # own 0.4 behind 0.5 -> 2
        [0.7, 0.8, 0.1],  # own 0.1 last -> 3
    ])
    assert match_ranks(scores).tolist() == [1, 2, 3]
    m = rank_metrics(scores, ks=(1, 2, 5))
    assert m["pool_size"] == 3 and m["queries"] == 3
    assert m["top1"] == pytest.approx(1 / 3) and m["top2"] == pytest.approx(2 / 3) and m["top5"] == 1.0
    assert m["chance_top1"] == pytest.approx(1 / 3) and m["chance_top2"] == pytest.approx(2 / 3)
    assert m["chance_top5"] == 1.0  # k > pool
    assert m["median_rank"] == 2.0 and m["mean_rank"] == 2.0 and m["chance_median_rank"] == 2.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_ties_count_against_the_query():
    scores = np.array([
        [0.5, 0.5, 0.5, 0.1],  # own tied with two others -> behind both -> 3
        [0.2, 0.5, 0.5, 0.5],  # own tied with two -> 3
        [0.0, 0.0, 0.0, 0.0],  # constant: last
        [0.3, 0.1, 0.2, 0.3],  # tied with one -> 2
    ])
    assert match_ranks(scores).tolist() == [3, 3, 4, 2]
    constant = np.ones((4, 2))
    assert paired_metrics(constant, constant)["top1"] == 0.0


def test_pool_of_one():
    m = rank_metrics(np.array([[0.0]]), ks=(1, 5))
    assert m == {"pool_size": 1, "queries": 1, "top1": 1.0, "chance_top1": 1.0, "top5": 1.0,
                 "chance_top5": 1.0, "median_rank": 1.0, "mean_rank": 1.0, "chance_median_rank": 1.0,
                 "mrr": 1.0}


def test_several_relevant_candidates_take_the_best_one():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    relevant = np.array([[False, False, True, False, True]])  # best relevant 0.7, two irrelevant above
    assert match_ranks(scores, relevant).tolist() == [3]
    m = rank_metrics(scores, relevant, ks=(1, 2, 3))
    # P(one of 2 relevant in the top k of 5) = 1 - C(3, k) / C(5, k)
    assert m["chance_top1"] == pytest.approx(2 / 5)
    assert m["chance_top2"] == pytest.approx(1 - 3 / 10)
    assert m["chance_top3"] == pytest.approx(1 - 1 / 10)
    assert m["chance_median_rank"] == pytest.approx(6 / 3)
    assert m["top2"] == 0.0 and m["top3"] == 1.0


def test_chance_top_k_exact():
    assert chance_top_k(10, 1) == pytest.approx(0.1)
    assert chance_top_k(10, 5) == pytest.approx(0.5)
    assert chance_top_k(10, 20) == 1.0
    assert chance_top_k(4, 1, n_relevant=4) == 1.0
    assert chance_top_k(6, 2, n_relevant=2) == pytest.approx(1 - 6 / 15)
    with pytest.raises(ValueError):
        chance_top_k(3, 1, n_relevant=0)


def test_query_without_a_relevant_candidate_is_an_error():
    with pytest.raises(ValueError, match="no relevant candidate"):
        match_ranks(np.zeros((2, 2)), np.array([[True, False], [False, False]]))


def test_both_directions_schema_and_empty():
    assert both_directions(np.zeros((0, 3)), np.zeros((0, 3))) == {"pool_size": 0}
    eye = np.eye(4)
    r = both_directions(eye, eye, ks=(1, 5))
    assert r["pool_size"] == 4
    for direction in ("fundus_to_oct", "oct_to_fundus"):
        d = r[direction]
        assert d["pool_size"] == 4 and d["top1"] == 1.0
        assert d["chance_top1"] == 0.25 and d["chance_top5"] == 1.0


def test_top_k_indices_are_stable_and_capped():
    scores = np.array([[0.1, 0.5, 0.5, 0.2]])
    assert top_k_indices(scores, 3).tolist() == [[1, 2, 3]]
    assert top_k_indices(scores, 10).tolist() == [[1, 2, 3, 0]]


def test_top_k_overlap():
    a = np.array([[4.0, 3, 2, 1, 0], [0, 1, 2, 3, 4]])
    b = np.array([[4.0, 3, 0, 1, 2], [0, 1, 2, 3, 4]])  # row 0: top-3 {0,1,2} vs {0,1,4}
    assert top_k_overlap(a, b, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert top_k_overlap(a, a, 10) == 1.0  # k > pool: the whole pool, same set
    assert top_k_overlap(np.zeros((0, 3)), np.zeros((0, 3))) == 1.0
