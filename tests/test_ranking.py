"""retinacli.ranking: hand-computed ranks, ties, chance levels, the one result schema."""

from __future__ import annotations

import numpy as np
import pytest

from retinacli.ranking import (
    both_directions,
    chance_top_k,
    eye_key,
    eye_relevance,
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


# Eye level. Five visits of three eyes with different visit counts: A (2 visits), B (1), C (2).
EYES = ["A", "A", "B", "C", "C"]
SCORES = np.array([  # fundus query (row) x OCT candidate (column)
    [0.2, 0.9, 0.1, 0.3, 0.0],  # A: other A visit 0.9 best -> eye 1; own 0.2 behind 0.9, 0.3 -> visit 3
    [0.5, 0.4, 0.5, 0.1, 0.0],  # A: best A 0.5 tied with B's 0.5 -> eye 2; own 0.4 behind two 0.5 -> visit 3
    [0.3, 0.3, 0.3, 0.3, 0.3],  # B: constant, only visit of its eye -> 5 at both levels
    [0.1, 0.2, 0.3, 0.4, 0.5],  # C: other C visit 0.5 best -> eye 1; own 0.4 behind 0.5 -> visit 2
    [0.9, 0.1, 0.1, 0.8, 0.2],  # C: best C 0.8 behind A's 0.9 -> eye 2; own 0.2 behind 0.9, 0.8 -> visit 3
])


def _hand_pool():
    # fundus @ identity.T = SCORES, so both_directions sees exactly the matrix above
    return both_directions(SCORES, np.eye(5), ks=(1, 2, 5), eyes=[("p1", e) for e in EYES])


def test_eye_relevance_and_eye_key():
    assert eye_relevance(["A", "B"], ["B", "A", "A"]).tolist() == [[False, True, True], [True, False, False]]
    assert eye_key({"patient_id": "p9", "eye": "OS", "visit": "2"}) == ("p9", "OS")
    # the same eye letter of two patients is two eyes
    assert eye_relevance([eye_key({"patient_id": "a", "eye": "OD"})], [("b", "OD")]).tolist() == [[False]]


def test_eye_level_fundus_to_oct_by_hand():
    r = _hand_pool()
    assert r["eye_level"]["eyes"] == 3
    visit, eye = r["fundus_to_oct"], r["eye_level"]["fundus_to_oct"]
    assert match_ranks(SCORES).tolist() == [3, 3, 5, 2, 3]
    assert match_ranks(SCORES, eye_relevance(EYES, EYES)).tolist() == [1, 2, 5, 1, 2]
    assert eye["pool_size"] == 5 and eye["queries"] == 5
    assert eye["top1"] == pytest.approx(2 / 5) and eye["top2"] == pytest.approx(4 / 5) and eye["top5"] == 1.0
    assert visit["top1"] == 0.0 and visit["top2"] == pytest.approx(1 / 5)
    # exact chance with m = 2, 2, 1, 2, 2 same-eye candidates in a pool of 5:
    # top-1 m/5; top-2 1 - C(5-m, 2)/C(5, 2) = 0.7 for m = 2, 0.4 for m = 1
    assert eye["chance_top1"] == pytest.approx((4 * 2 / 5 + 1 / 5) / 5)
    assert eye["chance_top2"] == pytest.approx((4 * 0.7 + 0.4) / 5)
    assert eye["chance_top5"] == 1.0
    assert eye["chance_median_rank"] == pytest.approx((4 * 6 / 3 + 6 / 2) / 5)  # (pool + 1) / (m + 1)
    assert eye["median_rank"] == 2.0 and eye["mean_rank"] == pytest.approx(11 / 5)
    assert eye["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 + 1 / 2) / 5)
    assert visit["mrr"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 5 + 1 / 2 + 1 / 3) / 5)
    assert visit["chance_top1"] == pytest.approx(1 / 5)


def test_eye_level_oct_to_fundus_by_hand():
    eye = _hand_pool()["eye_level"]["oct_to_fundus"]
    # OCT query j ranks the fundus rows by column j of SCORES:
    # col 0 (A) best A 0.5, behind C's 0.9 -> 2; col 1 (A) 0.9 -> 1; col 2 (B) own 0.3 behind 0.5 and the
    # tied 0.3 of row 3 -> 3; cols 3 and 4 (C) best C 0.8 / 0.5 -> 1
    assert match_ranks(SCORES.T, eye_relevance(EYES, EYES)).tolist() == [2, 1, 3, 1, 1]
    assert eye["top1"] == pytest.approx(3 / 5) and eye["top2"] == pytest.approx(4 / 5)
    assert eye["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 3 + 1 + 1) / 5)
    assert _hand_pool()["oct_to_fundus"]["top1"] == 0.0  # visit level: ranks 4, 2, 3, 2, 3


def test_eye_level_constant_embeddings_rank_behind_every_other_eye():
    # ties against the query: a constant model puts a query's eye after all m' other-eye candidates
    r = both_directions(np.ones((5, 3)), np.ones((5, 3)), ks=(1, 5), eyes=EYES)
    for direction in ("fundus_to_oct", "oct_to_fundus"):
        eye = r["eye_level"][direction]
        assert eye["top1"] == 0.0
        assert eye["mean_rank"] == pytest.approx((4 + 4 + 5 + 4 + 4) / 5)  # 1 + (5 - m)


def test_eye_level_with_one_visit_per_eye_equals_visit_level():
    rng = np.random.default_rng(1)
    f, o = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
    r = both_directions(f, o, eyes=[("p", str(i)) for i in range(7)])
    assert r["eye_level"]["eyes"] == 7
    for direction in ("fundus_to_oct", "oct_to_fundus"):
        assert r["eye_level"][direction] == r[direction]


def test_eye_level_is_never_below_visit_level():
    rng = np.random.default_rng(2)
    f, o = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    eyes = [("p", str(i // 3)) for i in range(30)]  # 10 eyes of 3 visits
    r = both_directions(f, o, eyes=eyes)
    for direction in ("fundus_to_oct", "oct_to_fundus"):
        visit, eye = r[direction], r["eye_level"][direction]
        for k in (1, 5, 10):
            assert eye[f"top{k}"] >= visit[f"top{k}"]
            assert eye[f"chance_top{k}"] == pytest.approx(chance_top_k(30, k, 3))
        assert eye["mrr"] >= visit["mrr"] and eye["mean_rank"] <= visit["mean_rank"]


def test_both_directions_without_eyes_is_unchanged():
    rng = np.random.default_rng(3)
    f, o = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    plain = both_directions(f, o)
    assert plain == {"pool_size": 6, "fundus_to_oct": paired_metrics(f, o),
                     "oct_to_fundus": paired_metrics(o, f)}
    with_eyes = both_directions(f, o, eyes=["x", "x", "y", "y", "z", "z"])
    assert {k: v for k, v in with_eyes.items() if k != "eye_level"} == plain
    with pytest.raises(ValueError, match="5 eye keys for 6"):
        both_directions(f, o, eyes=["x"] * 5)
