"""client.fusion on hand-made hit lists: the confidence rule (a single BM25 hit included), the fused
scores written out, and what each search mode returns."""

from __future__ import annotations

import math

import pytest

from client.fusion import (
    FACETS,
    MODES,
    combine,
    dense_similarity,
    facet_counts,
    fuse,
    lexical_confidence,
)
from client.store import Hit
from core.fusion_rule import SHIPPED

BASE_WEIGHT, CONFIDENT_WEIGHT, CONFIDENCE_RATIO = (SHIPPED.base_weight, SHIPPED.confident_weight,
                                                  SHIPPED.confidence_ratio)

pytestmark = pytest.mark.unit


def hits(*pairs, **fields) -> list[Hit]:
    return [Hit(pid, score, dict(fields)) for pid, score in pairs]


def ids(ranking: list[Hit]) -> list[str]:
    return [h.product_id for h in ranking]


DENSE = hits(("d1", 0.90), ("d2", 0.85), ("d3", 0.80))  # cosine similarities, none of them the code's product


def test_confidence_is_the_best_bm25_score_over_the_tenth():
    flat = hits(*((f"f{i}", 10.0 - 0.1 * i) for i in range(12)))  # the 10th is 9.1, the 11th and 12th ignored
    assert lexical_confidence(flat) == pytest.approx(10.0 / 9.1)
    peaked = hits(("z", 30.0), *((f"p{i}", 5.0) for i in range(9)))
    assert lexical_confidence(peaked) == pytest.approx(6.0) and 6.0 >= CONFIDENCE_RATIO  # 30 / 5
    assert lexical_confidence(hits(("a", 6.0), ("b", 2.0))) == pytest.approx(3.0)  # fewer than 10: the last one
    assert lexical_confidence([]) == 0.0


def test_a_single_bm25_hit_is_the_most_confident_case():
    """One hit: no other product holds any query term, a product code matched exactly one product. It used to
    count as not confident (0: 'without two hits'), so the code's product sank under the dense hits."""
    single = hits(("code", 12.3))
    assert lexical_confidence(single) == math.inf
    fused = fuse(DENSE, single)
    # Confident weight 0.5: code = 0.5 * 12.3 / 12.3 = 0.5; d1 = (1 - 0.5) * 0.90 = 0.45, d2 0.425, d3 0.40.
    # (At the base weight 0.35 it was code 0.35 < d3 0.65 * 0.80 = 0.52: last of four.)
    assert ids(fused) == ["code", "d1", "d2", "d3"]
    assert [h.score for h in fused] == pytest.approx([0.5, 0.45, 0.425, 0.40])
    assert fuse(DENSE, single, weight=BASE_WEIGHT)[-1].product_id == "code"  # what the old rule did
    assert lexical_confidence(hits(("zero", 0.0))) == 0.0  # a hit without a score is no evidence


def test_fused_score_is_weighted_bm25_over_its_best_plus_dense_similarity():
    lexical = hits(("a", 10.0), ("b", 5.0))
    dense = hits(("b", 0.8), ("c", 0.6))
    fused = fuse(dense, lexical, weight=0.3)
    # a: 0.3 * 10/10 = 0.30;  b: 0.3 * 5/10 + 0.7 * 0.8 = 0.15 + 0.56 = 0.71;  c: 0.7 * 0.6 = 0.42
    assert ids(fused) == ["b", "c", "a"]
    assert [h.score for h in fused] == pytest.approx([0.71, 0.42, 0.30])


def test_the_shipped_weight_follows_confidence():
    flat = hits(*((f"f{i}", 10.0 - 0.1 * i) for i in range(10)))  # 10 / 9.1 < 1.5: base weight
    assert fuse([], flat)[0].score == pytest.approx(BASE_WEIGHT)  # best lexical-only hit: weight * 1
    peaked = hits(("z", 30.0), *((f"p{i}", 5.0) for i in range(9)))
    assert fuse([], peaked)[0].score == pytest.approx(CONFIDENT_WEIGHT)


def test_fields_ties_and_a_zero_best_score():
    lexical = [Hit("both", 4.0, {"from": "lexical"}), Hit("lex", 4.0, {"from": "lexical"})]
    dense = [Hit("both", 0.5, {"from": "dense"}), Hit("den", 0.5, {"from": "dense"})]
    fused = {h.product_id: h for h in fuse(dense, lexical, weight=0.5)}
    assert fused["both"].fields == {"from": "lexical"} and fused["den"].fields == {"from": "dense"}
    # both: 0.5 * 1 + 0.5 * 0.5 = 0.75; lex: 0.5; den: 0.25
    assert [fused[p].score for p in ("both", "lex", "den")] == pytest.approx([0.75, 0.5, 0.25])
    tied = fuse([], hits(("x", 2.0), ("y", 2.0)))  # equal scores keep BM25's order
    assert ids(tied) == ["x", "y"]
    zero = fuse([], hits(("z", 0.0)), weight=0.5)  # no division by a zero best score
    assert zero[0].score == 0.0


def test_dense_similarity_per_metric():
    assert dense_similarity("IP")(0.7) == 0.7 and dense_similarity("COSINE")(-0.2) == -0.2
    l2 = dense_similarity("L2")  # squared distance on unit vectors: 2 - 2 cos
    assert (l2(0.0), l2(0.5), l2(2.0), l2(4.0)) == (1.0, 0.75, 0.0, -1.0)


def test_combine_modes():
    lexical = hits(("a", 3.0), ("b", 1.0))
    dense_l2 = hits(("c", 0.1), ("a", 1.0))  # L2 distances: c is the nearer
    assert MODES == ("hybrid", "dense", "lexical")
    assert combine("dense", dense_l2, lexical, "L2") == dense_l2  # Milvus's list and scores as they came
    assert combine("lexical", dense_l2, lexical, "L2") == lexical
    hybrid = combine("hybrid", dense_l2, lexical, "L2")
    assert hybrid == fuse(dense_l2, lexical, dense_similarity("L2"))
    # 3/1 = 3 >= 1.5: weight 0.5. a: 0.5 * 1 + 0.5 * (1 - 1.0/2) = 0.75; c: 0.5 * (1 - 0.1/2) = 0.475;
    # b: 0.5 * 1/3 = 0.1667
    assert ids(hybrid) == ["a", "c", "b"]
    assert [h.score for h in hybrid] == pytest.approx([0.75, 0.475, 0.5 / 3])
    # A query no BM25 term matched: hybrid keeps the dense order, scaled by the base weight's remainder.
    only_dense = combine("hybrid", hits(("x", 0.9), ("y", 0.8)), [], "COSINE")
    assert ids(only_dense) == ["x", "y"] and only_dense[0].score == pytest.approx((1 - BASE_WEIGHT) * 0.9)
    assert combine("hybrid", [], [], "IP") == []


def test_facets_count_values_most_frequent_first_and_skip_empty_ones():
    rows = [Hit(str(i), 1.0, {"base_colour": c, "gender": g})
            for i, (c, g) in enumerate([("Red", "Men"), ("Blue", "Men"), ("Red", ""), ("Red", None), ("", "Women")])]
    counts = facet_counts(rows)
    assert set(counts) == set(FACETS)
    assert counts["base_colour"] == [("Red", 3), ("Blue", 1)]
    assert counts["gender"] == [("Men", 2), ("Women", 1)]
    assert counts["article_type"] == [] and facet_counts([]) == {name: [] for name in FACETS}


def test_a_fitted_rule_also_trusts_a_lead_over_the_second_and_a_short_list():
    """The shipped rule reads best/10th only; a model set's rule may also read best/2nd and the list's length."""
    from core.fusion_rule import FusionRule

    lead = hits(("top", 13.0), ("2nd", 10.0), *((f"f{i}", 9.5) for i in range(20)))  # 13/9.5 < 1.5, 13/10 = 1.3
    short = hits(("a", 9.0), ("b", 9.0), ("c", 8.9))  # 3 products hold the term: 9/8.9 < 1.5
    fitted = FusionRule(base_weight=0.05, lead_ratio=1.25, rare_hits=10)
    assert not SHIPPED.confident([h.score for h in lead]) and not SHIPPED.confident([h.score for h in short])
    assert fitted.weight([h.score for h in lead]) == fitted.weight([h.score for h in short]) == 0.5
    assert fitted.weight([h.score for h in hits(*((f"f{i}", 10.0) for i in range(30)))]) == 0.05
    assert fuse([], lead, rule=fitted)[0].score == pytest.approx(0.5)
    assert combine("hybrid", [], short, "IP", fitted)[0].score == pytest.approx(0.5)
    assert fitted.weight([]) == 0.05 and fitted.weight([0.0]) == 0.05  # no BM25 evidence: the base weight


def test_a_rule_goes_through_json_and_refuses_nonsense():
    from core.fusion_rule import FusionRule

    fitted = FusionRule(base_weight=0.05, lead_ratio=1.25, rare_hits=10)
    assert FusionRule.from_json(fitted.to_json()) == fitted
    assert FusionRule.from_json(SHIPPED.to_json()) == SHIPPED and '"lead_ratio":null' in SHIPPED.to_json()
    assert FusionRule.from_dict({"base_weight": 0.2}) == FusionRule(base_weight=0.2)  # the rest: shipped
    for bad, match in (({"base_weight": 1.5}, "base_weight"), ({"lead_ratio": 0.5}, "lead_ratio"),
                       ({"rare_hits": -1}, "rare_hits"), ({"weight": 0.3}, "unknown keys")):
        with pytest.raises(ValueError, match=match):
            FusionRule.from_dict(bad)


def test_what_ranks_a_search_names_a_fitted_rule_but_not_the_shipped_one():
    from core.fusion_rule import FusionRule, ranking_model

    fitted = FusionRule(base_weight=0.05, rare_hits=10)
    assert ranking_model("abc-fp32", None) == ranking_model("abc-fp32", SHIPPED) == "abc-fp32"
    named = ranking_model("abc-fp32", fitted)
    assert named.startswith("abc-fp32+fusion-") and named == ranking_model("abc-fp32", FusionRule.from_json(
        fitted.to_json()))
    assert named != ranking_model("abc-fp32", FusionRule(base_weight=0.1, rare_hits=10))  # a refit: another model
