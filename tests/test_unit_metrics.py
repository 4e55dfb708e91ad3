"""core.metrics against values computed by hand and against trec_eval on a real run's rankings.

The reference is trec_eval's own C code through ir-measures (its pytrec_eval-terrier provider): nDCG@10,
P@k, R@k and the reciprocal rank, per query, on tests/data/mm3_concat_rankings.jsonl (README there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.metrics import KS, retrieval_metrics, without_query_products

pytestmark = pytest.mark.unit

RANKINGS = Path(__file__).parent / "data" / "mm3_concat_rankings.jsonl"
MEASURES = ("recall@1", "recall@10", "recall@100", "ndcg@10", "mrr@10")


def test_one_query_by_hand():
    # Hits at ranks 1 and 3 of 4; 3 relevant products, one ("c") never retrieved.
    got = retrieval_metrics([["a", "x", "b", "y"]], [["a", "b", "c"]])
    # recall@1   = 1 hit in the top 1 / min(1, 3)   = 1
    # recall@10  = 2 hits / min(10, 3)              = 2/3
    # recall@100 = 2 hits / min(100, 3)             = 2/3
    # DCG@10     = 1/log2(1+1) + 1/log2(3+1)         = 1 + 0.5 = 1.5
    # IDCG@10    = 1/log2(2) + 1/log2(3) + 1/log2(4) = 1 + 0.6309297535714575 + 0.5 = 2.1309297535714578
    # nDCG@10    = 1.5 / 2.1309297535714578         = 0.7039180890341347
    # MRR@10     = 1 / rank of the first hit (1)     = 1
    assert got == pytest.approx({"recall@1": 1.0, "recall@10": 2 / 3, "recall@100": 2 / 3,
                                 "ndcg@10": 0.7039180890341347, "mrr@10": 1.0, "queries": 1})


def test_a_late_single_hit_and_the_mean_over_queries():
    late = [["x", "y", "z", "b"]]  # the one relevant product at rank 4
    # recall@1 = 0; recall@10 = 1/min(10, 1) = 1; nDCG@10 = (1/log2(4+1)) / (1/log2(2)) = 0.43067655807339306;
    # MRR@10 = 1/4
    assert retrieval_metrics(late, [["b"]]) == pytest.approx(
        {"recall@1": 0.0, "recall@10": 1.0, "recall@100": 1.0, "ndcg@10": 0.43067655807339306, "mrr@10": 0.25,
         "queries": 1})
    # Two queries: the mean of each measure. Second query: hit at rank 2 of 2 relevant ("q", "r").
    # nDCG@10 = (1/log2(3)) / (1/log2(2) + 1/log2(3)) = 0.6309297535714575 / 1.6309297535714575 = 0.38685280723454163
    both = retrieval_metrics(late + [["x", "q"]], [["b"], ["q", "r"]])
    assert both["queries"] == 2
    assert both["mrr@10"] == pytest.approx((0.25 + 0.5) / 2)  # 0.375
    assert both["recall@10"] == pytest.approx((1 + 1 / 2) / 2)  # 0.75: 1 of min(10, 2) in the second
    assert both["ndcg@10"] == pytest.approx((0.43067655807339306 + 0.38685280723454163) / 2)


def test_cutoffs_hits_after_rank_10_count_only_for_recall_at_100():
    ranking = [f"x{i}" for i in range(10)] + ["hit"]  # the only relevant product at rank 11
    got = retrieval_metrics([ranking], [["hit"]])
    # Nothing in the top 10: recall@10, nDCG@10 and MRR@10 are 0; recall@100 = 1/min(100, 1) = 1.
    assert (got["recall@10"], got["ndcg@10"], got["mrr@10"], got["recall@100"]) == (0.0, 0.0, 0.0, 1.0)


def test_recall_is_capped_for_broad_queries():
    relevant = [f"p{i}" for i in range(20)]
    got = retrieval_metrics([relevant[:10]], [relevant])  # a perfect top 10 of 20 relevant, nothing after
    # recall@10  = 10 / min(10, 20)  = 1 (plain recall would be 10/20)
    # recall@100 = 10 / min(100, 20) = 0.5
    # nDCG@10 = 1: the ideal top 10 is also all relevant
    assert got["recall@10"] == 1.0 and got["recall@100"] == 0.5 and got["ndcg@10"] == pytest.approx(1.0)


def test_an_empty_ranking_scores_zero_and_bad_input_is_refused():
    assert retrieval_metrics([[]], [["a"]]) == {"recall@1": 0.0, "recall@10": 0.0, "recall@100": 0.0,
                                                "ndcg@10": 0.0, "mrr@10": 0.0, "queries": 1}
    with pytest.raises(ValueError, match="2 rankings for 1"):
        retrieval_metrics([["a"], ["b"]], [["a"]])
    with pytest.raises(ValueError, match="no queries"):
        retrieval_metrics([], [])
    with pytest.raises(ValueError, match="no relevant"):  # 0/0 would turn the whole mean into NaN
        retrieval_metrics([["a"], ["b"]], [["a"], []])


def test_without_query_products_by_hand():
    ranked, relevant = without_query_products([["q", "a", "b", "c"], ["q2", "z"]], [["q", "b"], ["q2"]],
                                              ["q", "q2"], k=2)
    # First query: "q" leaves its ranking and relevant set, the top 2 remain; the second had only itself.
    assert ranked == [["a", "b"]] and relevant == [["b"]]


def _load() -> tuple[dict, list[dict]]:
    header, *queries = (json.loads(line) for line in RANKINGS.read_text().splitlines())
    return header, queries


def _per_query(queries: list[dict]) -> list[dict[str, float]]:
    return [retrieval_metrics([q["ranked"]], [q["relevant"]]) for q in queries]


def test_the_committed_run_reproduces_its_reported_metrics():
    """The file holds every query the run scored: the mean of each kind is what it reported."""
    header, queries = _load()
    assert len(queries) == sum(m["queries"] for m in header["metrics"].values())
    for kind, reported in header["metrics"].items():
        mine = [q for q in queries if ("query" in q) == (kind == "text")]
        got = retrieval_metrics([q["ranked"] for q in mine], [q["relevant"] for q in mine])
        assert got == pytest.approx(reported, rel=1e-12), kind


def test_per_query_values_match_trec_eval_on_a_real_run():
    import ir_measures  # the dev extra
    from ir_measures import RR, P, R, nDCG

    _, queries = _load()
    # The data exercises what can go wrong: hits past rank 10, misses, broad and narrow relevant sets.
    ours = _per_query(queries)
    assert any(0 < m["mrr@10"] < 1 for m in ours) and any(m["ndcg@10"] == 0 < m["recall@100"] for m in ours)
    assert any(len(q["relevant"]) > 100 for q in queries) and any(len(q["relevant"]) == 1 for q in queries)

    qrels = {str(i): {pid: 1 for pid in q["relevant"]} for i, q in enumerate(queries)}
    # Strictly falling scores: trec_eval orders by score (ties by document id), we by list position.
    run = {str(i): {pid: float(len(q["ranked"]) - r) for r, pid in enumerate(q["ranked"])}
           for i, q in enumerate(queries)}
    top10 = {qid: dict(list(docs.items())[:10]) for qid, docs in run.items()}
    trec = {}
    for metric in ir_measures.pytrec_eval.iter_calc([nDCG @ 10, *(R @ k for k in KS), *(P @ k for k in KS)],
                                                    qrels, run):
        trec.setdefault(metric.query_id, {})[str(metric.measure)] = metric.value
    for metric in ir_measures.pytrec_eval.iter_calc([RR], qrels, top10):  # reciprocal rank within the top 10
        trec[metric.query_id]["RR@10"] = metric.value
    assert len(trec) == len(queries)

    for i, (q, mine) in enumerate(zip(queries, ours)):
        ref = trec[str(i)]
        # Capped recall@k is trec_eval's recall@k while |relevant| <= k, else its precision@k.
        expected = {f"recall@{k}": ref[f"R@{k}"] if len(q["relevant"]) <= k else ref[f"P@{k}"] for k in KS}
        expected |= {"ndcg@10": ref["nDCG@10"], "mrr@10": ref["RR@10"]}
        assert {m: mine[m] for m in MEASURES} == pytest.approx(expected, abs=1e-9), (i, q.get("query"))
