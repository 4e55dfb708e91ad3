import pytest

from core.catalog import read_catalog
from core.queries import TRAIN_TEMPLATES, brand_of, generate_queries, product_attributes, relevant_ids

pytestmark = pytest.mark.unit


def test_brand_is_read_before_the_gender_word():
    assert brand_of("Puma Men's Toe Crusher Black T-shirt") == "Puma"
    assert brand_of("United Colors of Benetton Women Red Top") == "United Colors of Benetton"
    assert brand_of("Nike Socks") == "Nike"


def test_generation_is_deterministic_and_every_query_matches_its_product(catalog_path):
    df, _ = read_catalog(catalog_path, limit=300)
    rows = df.to_dict("records")
    a = generate_queries(rows, seed=3)
    assert [q.text for q in a] == [q.text for q in generate_queries(rows, seed=3)]
    assert [q.text for q in a] != [q.text for q in generate_queries(rows, seed=4)]
    by_id = {r["product_id"]: product_attributes(r) for r in rows}
    assert all(q.matches(by_id[q.product_id]) for q in a)
    assert len({q.text for q in a}) == len(a) > 100


def test_relevance_is_every_product_matching_the_named_attributes(catalog_path):
    df, _ = read_catalog(catalog_path, limit=2000)
    rows = df.to_dict("records")
    attrs = [product_attributes(r) for r in rows]
    ids = [r["product_id"] for r in rows]
    query = next(q for q in generate_queries(rows, seed=0, templates=[TRAIN_TEMPLATES[1]])
                 if {a for a, _ in q.constraints} == {"base_colour", "article_type", "gender"})
    relevant = relevant_ids(query, attrs, ids)
    constraint = dict(query.constraints)
    expected = [pid for pid, a in zip(ids, attrs)
                if all(a[k].lower() == constraint[k] for k in ("base_colour", "article_type", "gender"))]
    assert sorted(relevant) == sorted(expected) and len(relevant) > 1
