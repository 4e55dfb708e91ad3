"""Team-draft interleaving: which of two rankers shoppers prefer, from clicks on one merged result list.

Radlinski, Kurup and Joachims, "How does clickthrough data reflect retrieval quality?" (CIKM 2008). For each
search, the two rankings are merged by a draft: the team with fewer picks so far (a coin flip on a tie) adds its
highest-ranked product not already shown. Every shown product belongs to the team that picked it, so a click
credits one ranker, and position bias hits both teams alike (each is as likely to hold any position).

A search is a *win* for the ranker whose team got more clicks, a tie otherwise (no clicks, or as many each).
The verdict is an exact two-sided sign test on the wins, ties left out: a winner is declared when the p-value is
under `alpha` at the planned number of impressions (a fixed horizon; looking at the p-value as it goes and
stopping at the first small one would declare winners of A/A tests far more often than alpha).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Interleaved", "Verdict", "credit", "sign_test", "team_draft", "verdict"]

A, B = "A", "B"


@dataclass(frozen=True)
class Interleaved:
    ids: list[str]  # what is shown, in order
    teams: list[str]  # the team (A or B) that picked each


def team_draft(a: Sequence[str], b: Sequence[str], k: int, rng: random.Random) -> Interleaved:
    """Up to `k` products from rankings `a` and `b`, merged by team draft."""
    ids: list[str] = []
    teams: list[str] = []
    shown: set[str] = set()
    picks = {A: 0, B: 0}
    rankings = {A: list(a), B: list(b)}
    cursor = {A: 0, B: 0}

    def next_of(team: str) -> str | None:
        ranking = rankings[team]
        while cursor[team] < len(ranking) and ranking[cursor[team]] in shown:
            cursor[team] += 1
        return ranking[cursor[team]] if cursor[team] < len(ranking) else None

    while len(ids) < k:
        first = A if picks[A] < picks[B] or (picks[A] == picks[B] and rng.random() < 0.5) else B
        team = first if next_of(first) is not None else (B if first == A else A)
        item = next_of(team)
        if item is None:  # both rankings exhausted
            break
        ids.append(item)
        teams.append(team)
        shown.add(item)
        picks[team] += 1
    return Interleaved(ids, teams)


def credit(teams: Sequence[str], clicked_positions: Iterable[int]) -> tuple[int, int]:
    """Clicks on team A's and team B's products; positions are 1-based."""
    a = b = 0
    for position in set(clicked_positions):
        if 1 <= position <= len(teams):
            if teams[position - 1] == A:
                a += 1
            else:
                b += 1
    return a, b


def sign_test(wins_a: int, wins_b: int) -> float:
    """Exact two-sided p-value of `wins_a` against `wins_b` if each win were a fair coin."""
    n = wins_a + wins_b
    if n == 0:
        return 1.0
    low = min(wins_a, wins_b)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Verdict:
    impressions: int  # interleaved searches
    wins_a: int
    wins_b: int
    ties: int
    p_value: float
    winner: str | None  # "A", "B" or None (no significant preference)
    delta: float  # (wins_a - wins_b) / impressions: the preference for A, in [-1, 1]


def verdict(outcomes: Sequence[tuple[int, int]], alpha: float = 0.05) -> Verdict:
    """The verdict on a fixed number of interleaved searches, each given as (clicks on A, clicks on B)."""
    wins_a = sum(a > b for a, b in outcomes)
    wins_b = sum(b > a for a, b in outcomes)
    ties = len(outcomes) - wins_a - wins_b
    p = sign_test(wins_a, wins_b)
    winner = (A if wins_a > wins_b else B) if p < alpha else None
    return Verdict(len(outcomes), wins_a, wins_b, ties, p, winner,
                   (wins_a - wins_b) / len(outcomes) if outcomes else 0.0)
