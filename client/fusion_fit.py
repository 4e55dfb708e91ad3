"""Fitting a query model set's hybrid fusion rule (core/fusion_rule.py) on shoppers' judgments, under the
committed evaluation sets.

Clicks say what shoppers like, the committed sets what is relevant: the fit takes the rule whose fused rankings
give the judged products the best nDCG@10, among the rules that keep every committed set's text metrics within a
tolerance of the serving model's. One base weight for every query cannot do both here (typed shorthand wants
little BM25, model codes want much), so the fit also chooses when BM25 counts as confident: by its lead over the
2nd hit and by a short list (a rare token matched), besides the shipped best-over-10th test.

Every candidate rule gives each query one of a few lexical weights, so each query is fused once per weight
(RULE_GRID's) and a rule's mean is a lookup per query: the whole grid costs a few fusions per query.

The judged rankings are condensed (Sakai 2007): unjudged products are left out before the cut at k. Judgments
exist only for what the serving ranking showed, so counting an unjudged product as irrelevant would score every
rule by how much it agrees with the rule that served the logs.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from client import store
from client.encoder import TritonEncoder
from client.fusion import combine, dense_similarity, fuse
from client.judgments import DEPTH
from client.search import FACET_DEPTH
from client.store import Hit
from client.upgrade import GATE_METRICS
from core.fusion_rule import SHIPPED, FusionRule
from core.metrics import retrieval_metrics

# What the fit may choose; the confident weight and the best-over-10th ratio stay the shipped ones.
RULE_GRID = {
    "base_weight": tuple(round(0.05 * i, 2) for i in range(11)),  # dense alone up to the confident weight
    "lead_ratio": (math.inf, 1.4, 1.25, 1.15, 1.1),
    "rare_hits": (0, 10),
}


def rules(grid: dict[str, Sequence] = RULE_GRID, base: FusionRule = SHIPPED) -> list[FusionRule]:
    """Every rule of the grid: `base` with each combination of the grid's fields."""
    names = list(grid)
    return [replace(base, **dict(zip(names, values))) for values in itertools.product(*(grid[n] for n in names))]


def judged_queries(path: Path, limit: int, seed: int) -> dict[str, dict[str, float]]:
    """Judged text queries with a product rated >= 0.5: {query: {product id: rating}}, at most `limit` (seeded)."""
    ratings: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        if item["kind"] == "text":
            ratings.setdefault(item["query"], {})[str(item["object_id"])] = float(item["rating"])
    queries = sorted(q for q, r in ratings.items() if max(r.values()) >= 0.5)
    random.Random(seed).shuffle(queries)
    return {q: ratings[q] for q in queries[:limit]}


def searched(encoder: TritonEncoder, client, collection: str, texts: list[str]) -> tuple[list, list]:
    """Each text's dense hits (embedded by `encoder`) and BM25 hits in `collection`, FACET_DEPTH deep."""
    index, dense, lexical = store.collection_index(client, collection), [], []
    for start in range(0, len(texts), 32):
        batch = texts[start:start + 32]
        dense += store.search(client, encoder.embed_queries(batch), FACET_DEPTH, collection, index=index)
        lexical += store.lexical_search(client, batch, FACET_DEPTH, collection)
    return dense, lexical


def committed_metrics(lists: tuple[list, list], relevant: list[list[str]], metric: str,
                      rule: FusionRule | None) -> dict:
    """nDCG@10 and recall@100 of the committed text queries fused by `rule` (None: the shipped one)."""
    ranked = [[h.product_id for h in combine("hybrid", d, lx, metric, rule)[:100]] for d, lx in zip(*lists)]
    found = retrieval_metrics(ranked, relevant, (10, 100))
    return {name: round(found[name], 5) for name in GATE_METRICS}


def condensed_ndcg(ranked: list[str], gains: dict[str, float], k: int = DEPTH) -> float:
    """nDCG@k of a ranking over the judged products only (Sakai 2007): unjudged ones are left out before the
    cut, so a ranking is not punished for products the logs never showed; gain: the rating."""
    kept = [p for p in ranked if p in gains][:k]
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(gains.values(), reverse=True)[:k]))
    return sum(gains[p] / math.log2(i + 2) for i, p in enumerate(kept)) / ideal if ideal > 0 else 0.0


@dataclass(frozen=True)
class Scored:
    """One query: its BM25 scores (what a rule reads) and its metrics at each lexical weight."""
    lexical_scores: tuple[float, ...]
    by_weight: dict[float, tuple[float, ...]]


def score_table(lists: tuple[list, list], metric: str, measure: Callable[[int, list[Hit]], tuple[float, ...]],
                weights: Sequence[float]) -> list[Scored]:
    """Each query of `lists` (dense, lexical) fused at each weight and measured: measure(query index, ranking)."""
    similarity, table = dense_similarity(metric), []
    for i, (dense, lexical) in enumerate(zip(*lists)):
        table.append(Scored(tuple(h.score for h in lexical),
                            {w: measure(i, fuse(dense, lexical, similarity, weight=w)) for w in weights}))
    return table


def judged_table(lists: tuple[list, list], metric: str, judged: dict[str, dict[str, float]],
                 weights: Sequence[float], k: int = DEPTH) -> list[Scored]:
    """The judged queries' lists (in `judged`'s order) scored by condensed nDCG@k at each weight."""
    texts = list(judged)
    return score_table(lists, metric, lambda i, ranking: (
        condensed_ndcg([h.product_id for h in ranking], judged[texts[i]], k),), weights)


def committed_table(lists: tuple[list, list], metric: str, relevant: list[list[str]],
                    weights: Sequence[float]) -> list[Scored]:
    """A committed set's text queries' lists scored by GATE_METRICS at each weight."""
    def measure(i: int, ranking: list[Hit]) -> tuple[float, ...]:
        found = retrieval_metrics([[h.product_id for h in ranking[:100]]], [relevant[i]], (10, 100))
        return tuple(found[m] for m in GATE_METRICS)
    return score_table(lists, metric, measure, weights)


def mean(table: list[Scored], rule: FusionRule) -> tuple[float, ...]:
    """The table's metrics averaged over its queries, each fused as `rule` fuses it."""
    picked = [row.by_weight[rule.weight(row.lexical_scores)] for row in table]
    return tuple(sum(values) / len(picked) for values in zip(*picked)) if picked else ()


def weights_of(candidates: Sequence[FusionRule]) -> list[float]:
    """Every lexical weight some candidate rule gives some query."""
    return sorted({w for r in candidates for w in (r.base_weight, r.confident_weight)})


def choose(judged: list[Scored], guard: dict[str, tuple[list[Scored], dict[str, float]]], tolerance: float,
           candidates: Sequence[FusionRule]) -> dict:
    """The candidate rule with the best mean judged score among those that keep every guarded set's
    GATE_METRICS within `tolerance` of its floor (guard: {set name: (table, {metric: floor})}); a tie keeps
    nearer the shipped rule. None allowed: the shipped rule, as the serving model has it."""
    def held(rule: FusionRule) -> dict[str, dict[str, float]]:
        return {name: dict(zip(GATE_METRICS, (round(v, 5) for v in mean(table, rule))))
                for name, (table, _) in guard.items()}

    def keeps(rule: FusionRule) -> bool:
        metrics = held(rule)
        return all(metrics[name][m] >= floor[m] - tolerance for name, (_, floor) in guard.items()
                   for m in GATE_METRICS)

    def nearness(rule: FusionRule) -> tuple:
        return (rule.lead_ratio == SHIPPED.lead_ratio, rule.rare_hits == SHIPPED.rare_hits,
                -abs(rule.base_weight - SHIPPED.base_weight))

    score = {r: mean(judged, r)[0] for r in candidates}
    allowed = [r for r in candidates if keeps(r)]
    chosen = max(allowed, key=lambda r: (round(score[r], 5), nearness(r))) if allowed else SHIPPED
    base_only = [r for r in allowed if r.lead_ratio == SHIPPED.lead_ratio and r.rare_hits == SHIPPED.rare_hits]
    best_base_only = max(base_only, key=lambda r: (round(score[r], 5), nearness(r))) if base_only else None
    as_dict = lambda r: json.loads(r.to_json()) if r else None  # noqa: E731
    return {"queries": len(judged), "rules": len(candidates), "allowed": len(allowed), "chosen": as_dict(chosen),
            "judged_ndcg": {"chosen": round(score[chosen] if chosen in score else mean(judged, chosen)[0], 5),
                            "shipped": round(mean(judged, SHIPPED)[0], 5),
                            "best_base_weight_only": round(score[best_base_only], 5) if best_base_only else None},
            "best_base_weight_only": as_dict(best_base_only),
            "committed": held(chosen), "committed_serving": {name: floor for name, (_, floor) in guard.items()}}


def fit_fusion_rule(encoder: TritonEncoder, client, collection: str, judged: dict[str, dict[str, float]],
                    guard: dict[str, tuple[list[str], list[list[str]], dict[str, float]]] | None = None,
                    tolerance: float = 0.01, candidates: Sequence[FusionRule] | None = None,
                    k: int = DEPTH) -> dict:
    """Fit the fusion rule for queries embedded by `encoder` and searched in `collection` (see the module's
    docstring). judged: {query: {product id: rating}}; guard: {set name: (texts, relevant lists, {metric:
    the serving model's value})}."""
    if not judged:
        raise ValueError("no judged text query with a product rated >= 0.5 to fit the fusion on")
    if not store.has_lexical(client, collection):
        raise ValueError(f"collection {collection!r} has no BM25 field: hybrid fusion has nothing to fit")
    candidates = list(candidates or rules())
    metric, weights = store.collection_index(client, collection)[1], weights_of(candidates)
    scored = judged_table(searched(encoder, client, collection, list(judged)), metric, judged, weights, k)
    tables = {name: (committed_table(searched(encoder, client, collection, texts), metric, relevant, weights), floor)
              for name, (texts, relevant, floor) in (guard or {}).items()}
    return {**choose(scored, tables, tolerance, candidates), "k": k}
