"""core.interleaving: the team draft's invariants, credit, the exact sign test, and the verdicts on clicks drawn
from a position-based model: A/A declares a winner about as often as alpha, a better ranker wins."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from core.interleaving import credit, sign_test, team_draft, verdict

pytestmark = pytest.mark.unit
EXAMINATION = 1.0 / np.arange(1, 11)


def test_the_draft_shows_each_product_once_and_keeps_the_teams_even():
    rng = random.Random(0)
    a, b = [f"p{i}" for i in range(20)], [f"p{i}" for i in (5, 0, 7, 1, 9, 2, 11, 3, 13, 4)]
    for _ in range(200):
        shown = team_draft(a, b, 10, rng)
        assert len(shown.ids) == 10 and len(set(shown.ids)) == 10
        for n in range(1, 11):  # every prefix: picks differ by at most one
            assert abs(shown.teams[:n].count("A") - shown.teams[:n].count("B")) <= 1
        assert shown.ids[0] in (a[0], b[0])
        for team, ranking in (("A", a), ("B", b)):  # a team shows its own products in its own order
            mine = [i for i, t in zip(shown.ids, shown.teams) if t == team]
            assert mine == sorted(mine, key=ranking.index)
    same = team_draft(a, a, 10, rng)
    assert same.ids == a[:10]
    short = team_draft(["x"], ["y"], 10, rng)
    assert sorted(short.ids) == ["x", "y"]


def test_credit_and_the_exact_sign_test():
    assert credit(["A", "B", "A", "B"], [1, 3, 4, 4, 9]) == (2, 1)
    assert sign_test(15, 5) == pytest.approx(0.04139, abs=1e-4)  # 2 * P(X <= 5), X ~ Bin(20, 1/2)
    assert sign_test(10, 10) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(0, 6) == pytest.approx(2 / 64)
    v = verdict([(1, 0)] * 15 + [(0, 1)] * 5 + [(0, 0)] * 30)
    assert (v.winner, v.wins_a, v.wins_b, v.ties, v.impressions, v.delta) == ("A", 15, 5, 30, 50, 0.2)
    assert verdict([(1, 0)] * 14 + [(0, 1)] * 6).winner is None


def _ndcg(grades: list[float]) -> float:
    dcg = sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(grades))
    ideal = sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(sorted(grades, reverse=True)))
    return dcg / ideal if ideal else 0.0


def _experiment(noise_a: float, noise_b: float, searches: int, seed: int) -> tuple:
    """Searches of 30 candidates with graded relevance; each ranker sorts them by relevance plus its noise; clicks
    by PBM (EXAMINATION, attractiveness from the grade) on the interleaved top 10."""
    rng = np.random.default_rng(seed)
    draft_rng = random.Random(seed)
    outcomes, ndcg = [], {"A": [], "B": []}
    for _ in range(searches):
        grades = rng.choice([0, 1, 2], size=30, p=[0.6, 0.25, 0.15])
        ids = [str(i) for i in range(30)]
        ranked = {}
        for team, noise in (("A", noise_a), ("B", noise_b)):
            order = np.argsort(-(grades + rng.normal(0, noise, 30)), kind="stable")
            ranked[team] = [ids[i] for i in order]
            ndcg[team].append(_ndcg([grades[i] for i in order[:10]]))
        shown = team_draft(ranked["A"], ranked["B"], 10, draft_rng)
        attractive = np.array([0.05, 0.35, 0.75])[[grades[int(i)] for i in shown.ids]]
        clicks = np.flatnonzero(rng.random(10) < EXAMINATION * attractive) + 1
        outcomes.append(credit(shown.teams, clicks.tolist()))
    return verdict(outcomes), float(np.mean(ndcg["A"]) - np.mean(ndcg["B"]))


def test_an_a_a_test_rarely_declares_a_winner_and_a_better_ranker_wins():
    aa = [_experiment(1.0, 1.0, 1000, seed)[0] for seed in range(20)]
    assert sum(v.winner is not None for v in aa) <= 2
    ab = [_experiment(0.8, 1.0, 5000, seed) for seed in range(20)]
    gap = np.mean([d for _, d in ab])
    assert 0.02 <= gap <= 0.06, gap  # rankers a few nDCG@10 points apart
    assert sum(v.winner == "A" for v, _ in ab) >= 19 and not any(v.winner == "B" for v, _ in ab)
