"""The upgrade gate (client/upgrade.py decide): what a candidate model must match to be promoted."""

from __future__ import annotations

import pytest

from client.upgrade import GATE_METRICS, decide

pytestmark = pytest.mark.unit


def kind(ndcg: float, recall: float, queries: int) -> dict:
    return {"ndcg@10": ndcg, "recall@100": recall, "recall@10": 0.0, "queries": queries}


SERVING = {"text": kind(0.50, 0.80, 100), "image": kind(0.40, 0.60, 50)}


def test_a_candidate_as_good_on_every_kind_and_metric_is_promoted():
    promoted, why = decide({"text": kind(0.50, 0.80, 100), "image": kind(0.395, 0.595, 50)}, SERVING, 0.01)
    assert promoted and all(name in why for name in GATE_METRICS)


def test_a_candidate_without_a_query_kind_is_refused_however_good_the_rest():
    promoted, why = decide({"text": kind(0.90, 0.99, 100)}, SERVING, 0.01)
    assert not promoted and "image queries: the serving model answers 50, the candidate 0" in why


def test_a_candidate_that_skipped_some_queries_of_a_kind_is_refused():
    promoted, why = decide({"text": kind(0.90, 0.99, 100), "image": kind(0.90, 0.99, 49)}, SERVING, 0.01)
    assert not promoted and "answers 50, the candidate 49" in why


@pytest.mark.parametrize("metric", GATE_METRICS)
def test_each_gate_metric_blocks_a_loss_beyond_the_tolerance(metric):
    worse = {k: dict(v) for k, v in SERVING.items()}
    worse["image"][metric] -= 0.02
    promoted, why = decide(worse, SERVING, 0.01)
    assert not promoted and f"image {metric}" in why
    assert decide(worse, SERVING, 0.03)[0]  # the same loss within a wider tolerance passes


def test_a_kind_the_serving_model_never_answered_is_not_required():
    serving = {**SERVING, "codes": kind(0.0, 0.0, 0)}
    assert decide({"text": kind(0.5, 0.8, 100), "image": kind(0.4, 0.6, 50)}, serving, 0.01)[0]
