"""The position-based click model (PBM): judgments from clicks, with the position bias taken out.

PBM: a shopper clicks the result at position r of query q when they examine that position (probability
gamma[r], the same for every query) and find the product attractive (alpha[q, d], the same at every position):
P(click) = gamma[r] * alpha[q, d]. Raw click-through rates mix the two. Examination is identified only up to a
factor (gamma * c, alpha / c fit alike), so position 1 is taken as always examined: gamma[1] = 1.

Examination comes from the randomized searches (`examination_from_randomized`): the page's explore share
(client/app.py) shows the top n of some searches in a uniformly random order, so every position of those
searches sees the same products on average, and its click rate over position 1's is gamma[r] / gamma[1]
(Joachims, Swaminathan and Schnabel, "Unbiased Learning-to-Rank with Biased Feedback", WSDM 2017). Fitting
gamma jointly with alpha by EM (`fit_pbm` without `examination`) is the textbook alternative; on logs with many
rarely-seen (query, product) pairs it drifts (a pair seen once is explained by its own alpha), so judgments fit
alpha with gamma held at the randomized estimate (bench/results/shoppers.md compares the two).

The EM updates (Chuklin, Markov and de Rijke, "Click Models for Web Search", 2015, section 4.2), over every
impression i = (pair, position, click):
    E: a clicked impression was examined and attractive; an unclicked one was examined with probability
       gamma (1 - alpha) / (1 - gamma alpha), attractive with alpha (1 - gamma) / (1 - gamma alpha)
    M: alpha[pair] and gamma[position] are the means of those posteriors over their impressions.
Attractiveness is smoothed by `prior` pseudo-impressions at the mean click rate of position 1, so a pair seen
twice is not judged 0 or 1.

Why not a library: none on PyPI fits (clickmodels 1.0.2 is Yandex's Python 2 scripts, released 2014, which
do not run on Python 3; ultr-bias-toolkit 0.0.5 is a personal toolkit that estimates examination only and needs
torch, which the client side must not import); PBM's EM and the randomized estimate are the lines below, tested
against simulated clicks with known parameters (tests/test_unit_clickmodels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PBM", "examination_from_randomized", "fit_pbm"]


@dataclass
class PBM:
    examination: np.ndarray  # [positions] gamma, examination[0] = 1 (position 1)
    attractiveness: np.ndarray  # [pairs] alpha of each (query, object) pair
    impressions: np.ndarray  # [pairs] how often each pair was shown
    clicks: np.ndarray  # [pairs] how often it was clicked
    iterations: int  # EM iterations run
    converged: bool


def examination_from_randomized(position: np.ndarray, click: np.ndarray, depth: int) -> np.ndarray:
    """gamma[r] / gamma[1] for r = 1..depth: the click rate at each position over position 1's, on impressions of
    searches whose top `depth` was shown in a uniformly random order."""
    position, click = np.asarray(position, np.int64), np.asarray(click, bool)
    shown = np.bincount(position - 1, minlength=depth)[:depth].astype(float)
    clicked = np.bincount(position - 1, weights=click, minlength=depth)[:depth]
    if (shown == 0).any() or clicked[0] == 0:
        raise ValueError(f"too few randomized impressions: every position 1..{depth} needs some, and position 1 "
                         "a click (raise the page's --explore-share, or wait for more traffic)")
    rate = clicked / shown
    return rate / rate[0]


def fit_pbm(pair: np.ndarray, position: np.ndarray, click: np.ndarray, n_pairs: int | None = None,
            n_positions: int | None = None, prior: float = 1.0, max_iterations: int = 500,
            tolerance: float = 1e-6, examination: np.ndarray | None = None) -> PBM:
    """PBM by EM on impressions: `pair` (int index of the (query, object) pair), `position` (1-based), `click`
    (bool). With `examination` (gamma per position) only attractiveness is fitted, gamma held there. Stops when
    no parameter moves more than `tolerance` in an iteration."""
    pair, position, click = np.asarray(pair, np.int64), np.asarray(position, np.int64), np.asarray(click, bool)
    if not (pair.shape == position.shape == click.shape) or pair.ndim != 1:
        raise ValueError("pair, position and click are 1-d arrays of one length: one entry per impression")
    if len(pair) == 0:
        raise ValueError("no impressions to fit")
    if position.min() < 1:
        raise ValueError("positions are 1-based")
    n_pairs = int(pair.max()) + 1 if n_pairs is None else n_pairs
    n_positions = int(position.max()) if n_positions is None else n_positions
    slot = position - 1
    impressions = np.bincount(pair, minlength=n_pairs).astype(float)
    per_position = np.bincount(slot, minlength=n_positions).astype(float)
    clicks = np.bincount(pair, weights=click, minlength=n_pairs)
    clicks_at = np.bincount(slot, weights=click, minlength=n_positions)
    base = clicks_at[0] / per_position[0] if per_position[0] else float(click.mean())  # the prior's mean
    alpha = np.full(n_pairs, max(base, 1e-3))
    fixed = examination is not None
    if fixed:
        gamma = np.asarray(examination, float)
        if gamma.shape != (n_positions,) or not ((gamma > 0) & (gamma <= 1.0 + 1e-9)).all():
            raise ValueError(f"examination is {n_positions} probabilities in (0, 1], one per position")
    else:
        gamma = np.full(n_positions, 0.5)
        gamma[0] = 1.0
    converged, iterations = False, 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007  (the count is reported)
        a, g = alpha[pair], gamma[slot]
        unclicked = ~click
        denominator = np.maximum(1.0 - g * a, 1e-12)
        attractive = np.where(unclicked, a * (1.0 - g) / denominator, 1.0)
        examined = np.where(unclicked, g * (1.0 - a) / denominator, 1.0)
        new_alpha = np.divide(np.bincount(pair, weights=attractive, minlength=n_pairs) + prior * base,
                              impressions + prior, out=np.full(n_pairs, base), where=impressions + prior > 0)
        new_gamma = np.divide(np.bincount(slot, weights=examined, minlength=n_positions), per_position,
                              out=np.ones(n_positions), where=per_position > 0)
        new_gamma[0] = 1.0  # the scale is free (gamma * c, alpha / c fit alike): position 1 is held at 1
        if fixed:
            new_gamma = gamma
        moved = max(np.abs(new_alpha - alpha).max(), np.abs(new_gamma - gamma).max())
        alpha, gamma = new_alpha, new_gamma
        if moved < tolerance:
            converged = True
            break
    return PBM(gamma, alpha, impressions, clicks, iterations, converged)
