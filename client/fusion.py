"""Lexical + dense fusion and facets over the fused hits, both pure functions of Milvus's hit lists.

The fusion was chosen by measurement on three query sets (model codes, rare names, attribute
phrases; bench/results/hybrid.md), where RRF(60) lost the exact matches (codes 17% at rank 1,
names 27%) and a fixed weighted sum either lost them (weight 0.3: codes 55%) or lost attribute
quality (0.5: nDCG@10 0.904 vs dense 0.909). What won on every set: a weighted sum of the dense
similarity and the BM25 score scaled by the best one, whose lexical weight rises when BM25 is
confident, i.e. its best score stands clear of its 10th, or it found a single product (a rare token
matched: a code, a name). The rule is core/fusion_rule.py's; a query model set may carry its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from client.store import Hit
from core.fusion_rule import SHIPPED, FusionRule, confidence

MODES = ("hybrid", "dense", "lexical")
FACETS = ("master_category", "article_type", "base_colour", "gender")


def lexical_confidence(lexical: Sequence[Hit]) -> float:
    """The best BM25 score over the 10th best (or the last one); 0 without a hit (core.fusion_rule.confidence).

    A single hit is infinitely confident: no other product holds any query term (a code or a name matched
    one product). That reading needs a list searched deeper than one hit, as every caller does (100).
    """
    return confidence([h.score for h in lexical])


def dense_similarity(metric: str) -> Callable[[float], float]:
    """How a dense hit's Milvus distance becomes a similarity: IP and COSINE already are one; L2 is
    squared Euclidean, 2 - 2 cos on unit vectors."""
    return (lambda distance: 1.0 - distance / 2.0) if metric == "L2" else float


def fuse(dense: Sequence[Hit], lexical: Sequence[Hit], similarity: Callable[[float], float] = float,
         weight: float | None = None, rule: FusionRule | None = None) -> list[Hit]:
    """One ranking from both lists: weight * bm25 / best bm25 + (1 - weight) * dense similarity.

    `similarity` turns the dense list's Milvus distance into a similarity (see dense_similarity); a
    product missing from one list gets 0 from it. `weight` None takes it from `rule` (default: the shipped
    rule, core.fusion_rule), which reads the BM25 list; a number fixes it (what the benchmark compares). A
    query model set may carry its own rule, fitted on shoppers' judgments (client/fusion_fit.py).
    """
    if weight is None:
        weight = (rule or SHIPPED).weight([h.score for h in lexical])
    scores: dict[str, float] = {}
    fields: dict[str, dict] = {}
    best = lexical[0].score if lexical and lexical[0].score > 0 else 1.0
    for hit in lexical:
        scores[hit.product_id] = weight * hit.score / best
        fields[hit.product_id] = hit.fields
    for hit in dense:
        scores[hit.product_id] = scores.get(hit.product_id, 0.0) + (1 - weight) * similarity(hit.score)
        fields.setdefault(hit.product_id, hit.fields)
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    return [Hit(pid, score, fields[pid]) for pid, score in ranked]


def combine(mode: str, dense: Sequence[Hit], lexical: Sequence[Hit], metric: str,
            rule: FusionRule | None = None) -> list[Hit]:
    """The ranking a search mode returns from the two lists Milvus gave (a list the mode skips is empty);
    `rule`: the query model set's own fusion rule (None: the shipped one)."""
    if mode == "hybrid":
        return fuse(dense, lexical, dense_similarity(metric), rule=rule)
    return list(lexical if mode == "lexical" else dense)


def facet_counts(hits: Sequence[Hit], names: Sequence[str] = FACETS) -> dict[str, list[tuple[str, int]]]:
    """Per facet, its values among the hits with their counts, most frequent first (empty values left out)."""
    return {name: Counter(str(h.fields.get(name) or "") for h in hits if h.fields.get(name)).most_common()
            for name in names}
