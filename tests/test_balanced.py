"""The long tail's evaluation: the balanced set (one photo and one text query per look, from held-out products),
and the macro averages and by-size table that say what a mean over queries hides."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from core.catalog import read_catalog
from core.metrics import grouped_metrics, retrieval_metrics
from core.queries import (
    BALANCED_EVAL_SET,
    DEFAULT_EVAL_SET,
    LOOK_TEMPLATES,
    QuerySet,
    evaluation_query_products,
    look,
    product_attributes,
    query_set_text,
)
from training.data import split_indices
from training.make_balanced_sets import balanced_lines

pytestmark = pytest.mark.unit


def test_the_macro_average_counts_each_look_once():
    ranked = [["a", "x"], ["x", "y"], ["b", "x"]]
    relevant = [["a"], ["a"], ["b"]]
    groups = ["shirts / blue", "shirts / blue", "bags / red"]  # a popular look with two queries, a rare one
    micro = retrieval_metrics(ranked, relevant)["ndcg@10"]
    grouped = grouped_metrics(ranked, relevant, groups)
    assert micro == pytest.approx(2 / 3)
    assert grouped["macro"]["ndcg@10"] == pytest.approx((0.5 + 1.0) / 2)  # shirts 0.5, bags 1.0
    assert grouped["macro"]["groups"] == 2


def test_queries_without_a_look_stay_out_of_the_macro_average_and_buckets_count_relevant_products():
    many = [str(i) for i in range(150)]
    ranked = [["a"], many[:100], ["q"]]
    relevant = [["a"], many, [str(i) for i in range(12)]]
    grouped = grouped_metrics(ranked, relevant, ["tops / red", None, None])
    assert grouped["macro"]["groups"] == 1 and grouped["macro"]["ndcg@10"] == 1.0
    buckets = grouped["by_relevant"]
    assert [buckets[label]["queries"] for label in buckets] == [1, 1, 0, 1]
    assert buckets["100 or more"]["recall@100"] == 1.0 and buckets["10-19"]["ndcg@10"] == 0.0
    assert buckets["20-99"]["ndcg@10"] is None


def test_a_query_set_reads_its_looks_from_the_group_or_from_type_and_colour(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"query": "red kurta", "relevant": ["1"], "constraints": {"article_type": "kurtas", "base_colour": "red"}},
        {"query": "puma shoes", "relevant": ["2"], "constraints": {"article_type": "casual shoes"}},
        {"image_product_id": "3", "relevant": ["3", "4"], "group": "watches / black"},
    ]))
    qs = QuerySet.load(path)
    assert qs.text_groups == ["kurtas / red", None] and qs.image_groups == ["watches / black"]


@pytest.fixture(scope="module")
def catalog_rows(catalog_path):
    df, _ = read_catalog(catalog_path, limit=4000)
    return df.to_dict("records")


def test_each_drawn_look_gives_a_held_out_photo_and_a_text_query_about_it(catalog_rows):
    lines = balanced_lines(catalog_rows, looks=25, min_products=3, val_fraction=0.05, seed=0)
    ids = [str(r["product_id"]) for r in catalog_rows]
    attrs = {pid: product_attributes(r) for pid, r in zip(ids, catalog_rows)}
    _, held_out = split_indices(ids, 0.05, 0)
    held = {ids[i] for i in held_out}
    photos, texts = lines[0::2], lines[1::2]
    assert len(photos) == len(texts) == 25
    assert len({p["group"] for p in photos}) == 25  # one photo per look
    sizes = Counter(look(a) for a in attrs.values())
    for photo, text in zip(photos, texts):
        key = look(attrs[photo["image_product_id"]])
        assert photo["group"] == text["group"] == " / ".join(key)
        assert photo["image_product_id"] in held and text["source_product_id"] == photo["image_product_id"]
        assert sorted(photo["relevant"]) == sorted(pid for pid, a in attrs.items() if look(a) == key)
        assert photo["look_products"] == sizes[key] >= 3
        assert text["constraints"]["article_type"] == key[0] and text["constraints"]["base_colour"] == key[1]
        assert "brand" not in text["constraints"]
        assert all(all(attrs[pid].get(k, "").lower() == v for k, v in text["constraints"].items())
                   for pid in text["relevant"])


def test_the_draw_is_seeded_uniform_over_looks_and_reaches_small_ones(catalog_rows):
    a = balanced_lines(catalog_rows, looks=25, min_products=3, val_fraction=0.05, seed=0)
    assert a == balanced_lines(catalog_rows, looks=25, min_products=3, val_fraction=0.05, seed=0)
    assert a != balanced_lines(catalog_rows, looks=25, min_products=3, val_fraction=0.05, seed=1)
    assert min(line["look_products"] for line in a) < 10  # the tail is in it, not only popular looks
    assert len(LOOK_TEMPLATES) >= 2 and all("{brand}" not in t for t in LOOK_TEMPLATES)


def test_the_committed_balanced_set_is_what_the_generator_writes(catalog_path):
    df, _ = read_catalog(catalog_path)
    lines = balanced_lines(df.to_dict("records"), looks=300, min_products=3, val_fraction=0.05, seed=0)
    assert BALANCED_EVAL_SET.read_text() == query_set_text(lines)


def test_calibration_asks_with_no_product_an_evaluation_set_asks_with(catalog_path):
    """The photo-query weight is chosen on held-out products that no committed evaluation set queries with:
    the sets' photos (the popular-look set's and the balanced set's) come from the same held-out split."""
    from training.calibrate import calibration_indices
    from training.data import build_product_set

    df, report = read_catalog(catalog_path)
    products = build_product_set(df, None, report)
    _, held_out = split_indices(products.ids, 0.05, 0)
    chosen = calibration_indices(products, held_out)
    asked = evaluation_query_products()
    calibration = {products.ids[i] for i in chosen}
    assert not calibration & asked
    held = {products.ids[i] for i in held_out}
    photos = set(QuerySet.load(DEFAULT_EVAL_SET).image_ids) | set(QuerySet.load(BALANCED_EVAL_SET).image_ids)
    assert photos <= held  # what made the overlap real: evaluation photos are held-out products
    assert calibration == held - asked and len(calibration) > len(held) // 2


def test_a_set_without_looks_has_no_macro_average_and_says_so():
    from core.metrics import format_groups

    grouped = grouped_metrics([["a"]], [["a"]], [None])  # a code query: about one product, no look
    assert grouped["macro"] == {"groups": 0, "ndcg@10": None, "recall@100": None}
    json.dumps(grouped, allow_nan=False)  # valid JSON: no NaN
    row = format_groups({"m": {"metrics": {"text": retrieval_metrics([["a"]], [["a"]])}, "groups": {"text": grouped}}})
    assert "nan" not in row and "| 1.000 / - | 1.000 / - |" in row
