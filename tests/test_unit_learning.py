"""The query-side promotion gate's decision (client/upgrade.py) and the judgments reader of the query-tower
trainer (training/from_judgments.py), without servers or models."""

from __future__ import annotations

import json
import math

import pytest

from client.upgrade import decide_query_side

pytestmark = pytest.mark.unit

OFFLINE_OK = (True, "not worse")
PREFERRED = {"interleaved_searches": 500, "planned_impressions": 500,
             "verdict": {"winner": "B", "wins_a": 40, "wins_b": 90, "ties": 370, "impressions": 500, "p_value": 1e-5}}


def test_the_gate_promotes_only_when_offline_holds_and_interleaving_prefers_the_candidate():
    assert decide_query_side(OFFLINE_OK, {}, PREFERRED, 0.01)[0]
    assert decide_query_side(OFFLINE_OK, {"current": 0.80, "candidate": 0.795}, PREFERRED, 0.01)[0]

    ok, why = decide_query_side((False, "text ndcg@10 0.9 -> 0.8"), {}, PREFERRED, 0.01)
    assert not ok and "0.9 -> 0.8" in why
    ok, why = decide_query_side(OFFLINE_OK, {"current": 0.80, "candidate": 0.78}, PREFERRED, 0.01)
    assert not ok and "held-out" in why and "worse" in why

    no_preference = {**PREFERRED, "verdict": {**PREFERRED["verdict"], "winner": None, "p_value": 0.4}}
    ok, why = decide_query_side(OFFLINE_OK, {}, no_preference, 0.01)
    assert not ok and "no significant preference" in why
    serving_preferred = {**PREFERRED, "verdict": {**PREFERRED["verdict"], "winner": "A"}}
    ok, why = decide_query_side(OFFLINE_OK, {}, serving_preferred, 0.01)
    assert not ok and "the serving model is preferred" in why

    # Without interleaving evidence (no --events, or fewer searches than planned) nothing is promoted.
    assert not decide_query_side(OFFLINE_OK, {}, {}, 0.01)[0]
    ok, why = decide_query_side(OFFLINE_OK, {}, {"interleaved_searches": 120, "planned_impressions": 500,
                                                 "verdict": None}, 0.01)
    assert not ok and "120 interleaved searches of the 500 planned" in why


def test_judgments_are_read_as_rated_text_queries_and_a_malformed_line_names_itself(tmp_path):
    from training.from_judgments import load_judgments, shuffled

    path = tmp_path / "judgments.jsonl"
    lines = [{"query": "red kurta", "kind": "text", "filter": "", "object_id": "1", "rating": 0.8},
             {"query": "red kurta", "kind": "text", "filter": "", "object_id": "2", "rating": 0.3},  # below the bar
             {"query": "red kurta", "kind": "text", "filter": "", "object_id": "99", "rating": 0.9},  # not in catalog
             {"query": "abc", "kind": "image", "filter": "", "object_id": "3", "rating": 0.9},  # a photo
             {"query": "blue jeans", "kind": "text", "filter": "", "object_id": "3", "rating": 0.6}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    judged = load_judgments(path, ["1", "2", "3"], min_rating=0.5)
    assert judged == {"red kurta": [(0, 0.8)], "blue jeans": [(2, 0.6)]}
    swapped = shuffled({**judged, "shoes": [(1, 0.7)]}, seed=3)
    assert sorted(swapped) == ["blue jeans", "red kurta", "shoes"]
    assert sorted(map(tuple, swapped.values())) == sorted(map(tuple, [[(0, 0.8)], [(2, 0.6)], [(1, 0.7)]]))
    assert any(swapped[q] != judged.get(q, [(1, 0.7)]) for q in swapped)

    path.write_text(path.read_text() + '{"query": "x", "kind": "text"}\n')
    with pytest.raises(ValueError, match=r"judgments.jsonl:6: not a judgment line"):
        load_judgments(path, ["1"], 0.5)
    with pytest.raises(FileNotFoundError, match="client.judgments"):
        load_judgments(tmp_path / "missing.jsonl", ["1"], 0.5)


def test_the_fusion_fit_scores_rankings_on_judged_products_only():
    from client.fusion_fit import condensed_ndcg

    gains = {"a": 1.0, "b": 0.5}
    assert condensed_ndcg(["a", "b"], gains) == pytest.approx(1.0)
    # Unjudged products in between do not count against a ranking: the logs never showed them.
    assert condensed_ndcg(["x", "a", "y", "b"], gains) == pytest.approx(1.0)
    swapped = (0.5 + 1.0 / math.log2(3)) / (1.0 + 0.5 / math.log2(3))
    assert condensed_ndcg(["b", "x", "a"], gains) == pytest.approx(swapped)
    assert condensed_ndcg(["x", "y"], gains) == 0.0
    assert condensed_ndcg(["a"], {"a": 0.0}) == 0.0


def test_the_fusion_fit_takes_the_best_judged_rule_the_committed_sets_allow():
    """Two kinds of query: shorthand (a full BM25 list) wants dense alone; a code (three BM25 hits) needs BM25.
    The judged queries are all shorthand, the committed set all codes: a base weight alone cannot serve both,
    a rule that trusts a short list can."""
    from client.fusion_fit import Scored, choose, rules
    from core.fusion_rule import SHIPPED

    weights = (0.0, 0.05, 0.35, 0.5)
    shorthand = Scored(tuple(10.0 - 0.01 * i for i in range(100)), {w: (0.9 - w,) for w in weights})
    code = Scored((9.0, 9.0, 8.9), {w: (1.0 if w >= 0.35 else 0.5, 1.0) for w in weights})
    judged, committed = [shorthand] * 4, [code] * 3
    floor = {"ndcg@10": 1.0, "recall@100": 1.0}
    candidates = rules({"base_weight": weights, "rare_hits": (0, 10)})
    fit = choose(judged, {"codes": (committed, floor)}, 0.01, candidates)
    assert fit["chosen"]["base_weight"] == 0.0 and fit["chosen"]["rare_hits"] == 10
    assert fit["judged_ndcg"]["chosen"] == pytest.approx(0.9) and fit["judged_ndcg"]["shipped"] == pytest.approx(0.55)
    assert fit["best_base_weight_only"]["base_weight"] == 0.35  # the lowest base weight alone that keeps the codes
    assert fit["committed"]["codes"] == {"ndcg@10": 1.0, "recall@100": 1.0}
    assert fit["allowed"] == 6 and fit["rules"] == 8  # 0.35 and 0.5 at either rare_hits; 0.0 and 0.05 with it
    # Nothing the committed set allows: the shipped rule, as the serving model has it.
    none = choose(judged, {"codes": (committed, {"ndcg@10": 2.0, "recall@100": 1.0})}, 0.01, candidates)
    assert none["allowed"] == 0 and none["chosen"] == json.loads(SHIPPED.to_json())
