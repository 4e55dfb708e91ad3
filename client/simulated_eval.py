"""SIMULATED relevance: a served model's nDCG@10 on the simulated shoppers' intents, graded by the simulator's
truth (client/simulated_shoppers.py: 2 every attribute of the intent, 1 the type in another colour, 0).

    python -m client.simulated_eval --url http://127.0.0.1:8080 --queries 300 --exclude runs/simulation/truth.json

Held-out queries: intents drawn by the simulator's own law from a seed stream of their own (`--seed`), phrased
as shoppers phrase them, without any query text of the simulated sessions named by --exclude (their truth.json):
a model trained on those sessions' judgments is scored on queries it never saw. Every search goes through the
page's API like a shopper's (client_id "simulated-evaluation"; judgments leave it out by taking the prefix
"simulated-shopper"), and the ideal ranking for the nDCG is every catalog product graded for the intent.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.simulated_shoppers import DEPTH, SIMULATED, Intent, draw_intent, load_intents, phrase
from core.catalog import DEFAULT_CATALOG, read_catalog

logger = logging.getLogger("client.simulated_eval")
CLIENT_ID = f"{SIMULATED}-evaluation"


def held_out_queries(intents: Sequence[Intent], weights: Sequence[float], n: int, seed: int,
                     exclude: set[str] = frozenset()) -> list[tuple[str, Intent]]:
    """`n` distinct (query text, intent) pairs, drawn as the simulator draws sessions' first queries, none in
    `exclude`."""
    rng = random.Random(f"held-out:{seed}")
    out: dict[str, Intent] = {}
    for _ in range(100 * n):
        if len(out) >= n:
            break
        intent = draw_intent(intents, weights, rng)
        text = phrase(intent, rng)
        if text not in exclude and text not in out:
            out[text] = intent
    return list(out.items())


def dcg(grades: Sequence[int]) -> float:
    return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(grades))


def ideal_dcg(intent: Intent, products: Sequence[dict], k: int = DEPTH) -> float:
    grades = sorted((intent.grade(p) for p in products), reverse=True)[:k]
    return dcg(grades)


class Grader:
    """The simulator's truth over a catalog's products: nDCG@k of a ranking for an intent, the ideal ranking
    being every product of the catalog graded for it."""

    COLUMNS = ("product_id", "article_type", "base_colour", "gender")  # what Intent.grade reads

    def __init__(self, products: dict[str, dict]):
        self.products = products
        self.by_type: dict[str, list[dict]] = {}
        for row in products.values():
            self.by_type.setdefault(str(row.get("article_type", "")).lower(), []).append(row)

    @classmethod
    def from_catalog(cls, catalog: str, limit: int | None = None) -> Grader:
        df, _ = read_catalog(catalog, limit=limit)
        return cls({str(r["product_id"]): r for r in df[list(cls.COLUMNS)].to_dict("records")})

    def ndcg(self, intent: Intent, ranked: Sequence[str], fields: dict[str, dict] | None = None,
             k: int = DEPTH) -> float | None:
        """nDCG@k of the ranked product ids (a product the catalog lacks is graded by `fields`, the hit's own);
        None when no product of the catalog is relevant to the intent."""
        ideal = ideal_dcg(intent, self.by_type.get(intent.article_type.lower(), []), k)
        if ideal == 0:
            return None
        fields = fields or {}
        return dcg([intent.grade(self.products.get(p) or fields.get(p, {})) for p in ranked[:k]]) / ideal


def evaluate(url: str, queries: Sequence[tuple[str, Intent]], grader: Grader, mode: str = "hybrid",
             k: int = DEPTH, timeout_s: float = 10.0) -> dict:
    """Mean nDCG@k over the queries, searched through the page; a failed search counts as a failure, not a 0."""
    scores, failures = [], 0
    for text, intent in queries:
        params = urllib.parse.urlencode({"q": text, "k": k, "mode": mode, "client_id": CLIENT_ID})
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/api/search?{params}", timeout=timeout_s) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failures += 1
            logger.warning("evaluation search %r failed: %s", text, exc)
            continue
        hits = body["hits"][:k]
        score = grader.ndcg(intent, [h["product_id"] for h in hits], {h["product_id"]: h["fields"] for h in hits}, k)
        if score is not None:
            scores.append(score)
    if failures:
        logger.warning("%d of %d evaluation searches failed: left out of the mean", failures, len(queries))
    return {"simulated": True, "queries": len(queries), "scored": len(scores), "failures": failures, "mode": mode,
            "k": k, "ndcg": sum(scores) / len(scores) if scores else None}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m client.simulated_eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the page whose API is searched")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="the catalog the page serves (the grades' products)")
    p.add_argument("--limit", type=int, default=None, help="the catalog's first N products only (a page indexed so)")
    p.add_argument("--queries", type=int, default=300, help="held-out queries")
    p.add_argument("--seed", type=int, default=0, help="the simulator's seed (its intents' order) and this draw's")
    p.add_argument("--exclude", type=Path, action="append", default=[],
                   help="a simulation's truth.json whose query texts are left out (repeatable)")
    p.add_argument("--mode", default="hybrid", choices=("hybrid", "dense", "lexical"), help="the searches' mode")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here too")
    args = p.parse_args(argv)
    intents, weights, _ = load_intents(args.catalog, args.seed, args.limit)
    exclude: set[str] = set()
    for path in args.exclude:
        exclude |= set(json.loads(path.read_text())["queries"])
    queries = held_out_queries(intents, weights, args.queries, args.seed, exclude)
    result = evaluate(args.url, queries, Grader.from_catalog(args.catalog, args.limit), args.mode)
    result["excluded_texts"] = len(exclude)
    logger.info("SIMULATED relevance: nDCG@%d %s over %d held-out queries (%s, %d failed)", result["k"],
                f"{result['ndcg']:.4f}" if result["ndcg"] is not None else "-", result["scored"], args.mode,
                result["failures"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
