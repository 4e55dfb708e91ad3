"""core.clickmodels on clicks drawn from a known position-based model: examination and attractiveness come back,
where raw click-through rates do not."""

from __future__ import annotations

import numpy as np
import pytest

from core.clickmodels import examination_from_randomized, fit_pbm

pytestmark = pytest.mark.unit
EXAMINATION = 1.0 / np.arange(1, 11)


def simulated_log(searches: int, explore: float, seed: int = 0, queries: int = 300, randomized: bool = False):
    """Searches of Zipf-popular queries, 10 results each in a fixed order (a share of them shuffled), clicks drawn
    from PBM with EXAMINATION and per-(query, result) attractiveness, higher near the top as a ranker makes it."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, queries + 1)
    alpha = np.clip(rng.beta(3, 2, size=(queries, 10)) * np.linspace(1.1, 0.7, 10), 0, 1)
    asked = rng.choice(queries, size=searches, p=popularity / popularity.sum())
    order = np.tile(np.arange(10), (searches, 1))
    explored = rng.random(searches) < explore
    for i in np.flatnonzero(explored):
        order[i] = rng.permutation(10)
    pair = (asked[:, None] * 10 + order).ravel()
    position = np.tile(np.arange(1, 11), searches)
    click = rng.random(pair.shape) < EXAMINATION[position - 1] * alpha.ravel()[pair]
    if randomized:
        return pair, position, click, alpha.ravel(), np.repeat(explored, 10)
    return pair, position, click, alpha.ravel()


def test_examination_from_the_randomized_searches_is_within_ten_percent_and_beats_raw_ctr():
    pair, position, click, _, shuffled = simulated_log(20_000, explore=0.5, seed=1, randomized=True)
    examination = examination_from_randomized(position[shuffled], click[shuffled], 10)
    error = np.abs(examination - EXAMINATION) / EXAMINATION
    assert error.max() < 0.10, error.round(3)
    ctr = np.bincount(position - 1, weights=click) / np.bincount(position - 1)
    assert (np.abs(ctr / ctr[0] - EXAMINATION) / EXAMINATION).max() > 2 * error.max()
    with pytest.raises(ValueError, match="too few randomized"):
        examination_from_randomized(position[:5], click[:5], 10)


def test_attractiveness_with_examination_held_is_recovered():
    pair, position, click, alpha = simulated_log(20_000, explore=0.5)
    model = fit_pbm(pair, position, click, n_pairs=3000, n_positions=10, examination=EXAMINATION)
    assert (model.examination == EXAMINATION).all() and model.converged
    seen = model.impressions >= 200
    assert np.abs(model.attractiveness[seen] - alpha[seen]).mean() < 0.05
    with pytest.raises(ValueError, match="probabilities"):
        fit_pbm(pair, position, click, n_positions=10, examination=np.zeros(10))


def test_joint_em_recovers_examination_within_ten_percent_where_pairs_are_well_seen():
    pair, position, click, _ = simulated_log(20_000, explore=0.5)
    model = fit_pbm(pair, position, click, n_pairs=3000, n_positions=10)
    error = np.abs(model.examination - EXAMINATION) / EXAMINATION
    assert model.converged and error.max() < 0.10, error.round(3)
    shown = np.bincount(position - 1)
    ctr = np.bincount(position - 1, weights=click) / shown
    raw_error = np.abs(ctr / ctr[0] - EXAMINATION) / EXAMINATION  # the baseline: raw CTR, bias mixed in
    assert raw_error.max() > 2 * error.max()


def test_attractiveness_of_well_seen_pairs_is_recovered():
    pair, position, click, alpha = simulated_log(20_000, explore=0.5)
    model = fit_pbm(pair, position, click, n_pairs=3000, n_positions=10, prior=1.0)
    seen = model.impressions >= 200
    assert seen.sum() > 100
    assert np.abs(model.attractiveness[seen] - alpha[seen]).mean() < 0.05
    assert np.corrcoef(model.attractiveness[seen], alpha[seen])[0, 1] > 0.95


def test_bad_logs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="no impressions"):
        fit_pbm(np.array([], int), np.array([], int), np.array([], bool))
    with pytest.raises(ValueError, match="1-based"):
        fit_pbm(np.array([0]), np.array([0]), np.array([True]))
    with pytest.raises(ValueError, match="one length"):
        fit_pbm(np.array([0, 1]), np.array([1]), np.array([True]))
