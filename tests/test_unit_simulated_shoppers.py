"""The SIMULATED shoppers' behaviour, without a page: relevance, phrasing apart from the training generator's,
seeded appeal, attractiveness ordered by relevance, intents drawn from a catalog's looks."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from client.simulated_shoppers import GENDER_SHORT, Intent, ShopperModel, load_intents, phrase
from core.queries import EVAL_TEMPLATES, TRAIN_TEMPLATES

pytestmark = pytest.mark.unit
BLUE_SHIRT = {"article_type": "Shirts", "base_colour": "Blue", "gender": "Men", "price": 20.0}


def test_relevance_is_graded_by_the_intents_attributes():
    intent = Intent("Shirts", "Blue", "Men")
    assert intent.grade(BLUE_SHIRT) == 2
    assert intent.grade({**BLUE_SHIRT, "base_colour": "Red"}) == 1
    assert intent.grade({**BLUE_SHIRT, "gender": "Unisex"}) == 2  # unisex fits everyone
    assert intent.grade({**BLUE_SHIRT, "gender": "Women"}) == 0
    assert intent.grade({**BLUE_SHIRT, "article_type": "Tshirts"}) == 0
    assert Intent("Shirts").grade({**BLUE_SHIRT, "base_colour": "Red", "gender": "Women"}) == 2


def test_queries_name_exactly_the_intent_and_are_not_the_generators_phrasings(monkeypatch):
    import client.simulated_shoppers as sim
    from core.queries import product_attributes, render

    monkeypatch.setattr(sim, "TYPO", 0.0)
    rng = random.Random(0)
    gender_words = {w for words in GENDER_SHORT.values() for w in " ".join(words).split()}
    for intent in (Intent("Shirts", "Blue", "Men"), Intent("Shirts", "", "Women"), Intent("Shirts", "Red", ""),
                   Intent("Shirts")):
        for _ in range(50):
            words = phrase(intent, rng).split()
            assert any(w.startswith("shirt") for w in words)
            assert (intent.colour.lower() in words) == bool(intent.colour)
            assert bool(gender_words & set(words)) == bool(intent.gender)
    product = product_attributes({**BLUE_SHIRT, "title": "Arrow Men Blue Shirt", "usage": "Casual"})
    generator = {q.text for t in TRAIN_TEMPLATES + EVAL_TEMPLATES for _ in range(20)
                 if (q := render(t, product, "1", rng)) is not None}
    shoppers = {phrase(Intent("Shirts", "Blue", "Men"), rng) for _ in range(200)}
    shoppers |= {phrase(Intent("Shirts", "Blue"), rng) for _ in range(200)}
    assert len(shoppers) >= 10 and not shoppers & generator, shoppers & generator
    clean = [phrase(Intent("Shirts", "Blue", "Men"), random.Random(seed)) for seed in range(20)]
    monkeypatch.setattr(sim, "TYPO", 1.0)  # a letter dropped (none when the draw lands on a space)
    typed = [phrase(Intent("Shirts", "Blue", "Men"), random.Random(seed)) for seed in range(20)]
    assert all(len(c) - len(t) in (0, 1) for c, t in zip(clean, typed))
    assert sum(len(c) - len(t) for c, t in zip(clean, typed)) >= 12


def test_attractiveness_follows_relevance_and_appeal_is_seeded():
    model = ShopperModel.make({"Shirts": 30.0}, seed=0)
    assert model.examination[0] == 1.0 and model.examination[9] == pytest.approx(0.1)
    assert model.appeal("42") == ShopperModel.make({}, seed=0).appeal("42") != ShopperModel.make({}, 1).appeal("42")
    intent = Intent("Shirts", "Blue", "Men")
    relevant, other_colour = BLUE_SHIRT, {**BLUE_SHIRT, "base_colour": "Red"}
    wrong_type = {**BLUE_SHIRT, "article_type": "Watches"}
    mean = [sum(model.attractiveness(intent, p, str(i)) for i in range(300)) / 300
            for p in (relevant, other_colour, wrong_type)]
    assert mean[0] > mean[1] > mean[2] and mean[0] > 0.6 and mean[2] < 0.25


def test_intents_are_the_catalogs_looks_with_enough_products(tmp_path):
    rows = ([{"product_id": f"s{i}", "title": "Shirt", "article_type": "Shirts", "base_colour": "Blue",
              "gender": "Men", "price": 10.0 + i} for i in range(6)]
            + [{"product_id": f"w{i}", "title": "Watch", "article_type": "Watches", "base_colour": "Black",
                "gender": "Women", "price": 50.0} for i in range(2)])
    path = tmp_path / "catalog.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    intents, weights, median = load_intents(str(path), seed=0)
    assert intents == [Intent("Shirts", "Blue", "Men")] and weights == [1.0]
    assert median == {"Shirts": 12.5, "Watches": 50.0}


def test_held_out_queries_are_distinct_seeded_and_leave_out_the_sessions_texts():
    from client.simulated_eval import dcg, held_out_queries, ideal_dcg

    intents = [Intent("Shirts", "Blue", "Men"), Intent("Watches", "Black", "Women"), Intent("Jeans", "Blue", "Men")]
    first = held_out_queries(intents, [1.0, 0.5, 0.3], 20, seed=0)
    assert first == held_out_queries(intents, [1.0, 0.5, 0.3], 20, seed=0) and len({t for t, _ in first}) == 20
    excluded = {t for t, _ in first[:10]}
    again = held_out_queries(intents, [1.0, 0.5, 0.3], 20, seed=0, exclude=excluded)
    assert not excluded & {t for t, _ in again}
    assert dcg([2, 0, 1]) == pytest.approx(3 + 1 / 2)
    products = [BLUE_SHIRT, {**BLUE_SHIRT, "base_colour": "Red"}, {**BLUE_SHIRT, "article_type": "Watches"}]
    assert ideal_dcg(Intent("Shirts", "Blue", "Men"), products) == pytest.approx(dcg([2, 1, 0]))
    from client.simulated_eval import Grader

    grader = Grader({str(i): {**p, "product_id": str(i)} for i, p in enumerate(products)})
    blue = Intent("Shirts", "Blue", "Men")
    assert grader.ndcg(blue, ["0", "1"]) == pytest.approx(1.0)
    assert grader.ndcg(blue, ["1", "0"]) == pytest.approx(dcg([1, 2]) / dcg([2, 1]))
    assert grader.ndcg(blue, ["x"], {"x": BLUE_SHIRT}) == pytest.approx(dcg([2]) / dcg([2, 1]))  # the hit's fields
    assert grader.ndcg(Intent("Jeans", "Blue", "Men"), ["0"]) is None  # nothing in the catalog is relevant
