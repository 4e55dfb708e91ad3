"""Retrieval metrics over ranked id lists (numpy only: the client's evaluation uses them too).

Recall@k is capped: |relevant in top k| / min(k, |relevant|). A broad query ("black tshirts")
has hundreds of relevant products, and plain recall@10 could never exceed 10/|relevant|; the capped
form is 1.0 when the top k is all relevant, like the R-cap of BEIR.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 10, 100)


def per_query(ranked: Sequence[Sequence[str]], relevant: Sequence[Sequence[str]],
              ks: Sequence[int] = KS) -> dict[str, list[float]]:
    """Each query's Recall@k (capped), nDCG@10 and reciprocal rank within 10, in query order."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} relevance lists")
    if not ranked:
        raise ValueError("no queries to evaluate")
    scores: dict[str, list[float]] = {f"recall@{k}": [] for k in ks}
    scores["ndcg@10"], scores["mrr@10"] = [], []
    discounts = 1.0 / np.log2(np.arange(2, 12))
    for ranking, rel in zip(ranked, relevant):
        rel = set(rel)
        if not rel:  # nothing to find: every measure would be 0 / 0 (callers drop such queries)
            raise ValueError("a query has no relevant products")
        hits = np.fromiter((pid in rel for pid in ranking), dtype=bool, count=len(ranking))
        for k in ks:
            scores[f"recall@{k}"].append(float(hits[:k].sum() / min(k, len(rel))))
        top = hits[:10]
        ideal = discounts[: min(10, len(rel))].sum()
        scores["ndcg@10"].append(float((top * discounts[: len(top)]).sum() / ideal))
        first = np.flatnonzero(top)
        scores["mrr@10"].append(1.0 / (first[0] + 1) if len(first) else 0.0)
    return scores


def retrieval_metrics(ranked: Sequence[Sequence[str]], relevant: Sequence[Sequence[str]],
                      ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean Recall@k (capped), nDCG@10 and MRR@10 over queries; `ranked[i]` is best first."""
    out: dict[str, float] = {name: float(np.mean(v)) for name, v in per_query(ranked, relevant, ks).items()}
    out["queries"] = len(ranked)
    return out


# How many products a query has to find (after its own product leaves an image query's relevant set).
RELEVANT_BUCKETS = ((1, 9, "fewer than 10"), (10, 19, "10-19"), (20, 99, "20-99"), (100, None, "100 or more"))
GROUP_METRICS = ("ndcg@10", "recall@100")


def grouped_metrics(ranked: Sequence[Sequence[str]], relevant: Sequence[Sequence[str]],
                    groups: Sequence[str | None]) -> dict:
    """What a mean over queries hides: the macro average over groups (each look's queries averaged first, then
    the looks, so a popular look counts once; queries without a group left out) and the means by how many
    relevant products a query has (RELEVANT_BUCKETS)."""
    if not (len(ranked) == len(relevant) == len(groups)):
        raise ValueError("ranked, relevant and groups must be parallel lists")
    scores = per_query(ranked, relevant, ks=(100,))
    by_group: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        if group is not None:
            by_group.setdefault(group, []).append(i)
    macro: dict[str, float | int | None] = {"groups": len(by_group)}  # None: no query has a look (JSON null)
    for name in GROUP_METRICS:
        macro[name] = (float(np.mean([np.mean([scores[name][i] for i in members]) for members in by_group.values()]))
                       if by_group else None)
    sizes = [len(set(rel)) for rel in relevant]
    buckets = {}
    for low, high, label in RELEVANT_BUCKETS:
        members = [i for i, n in enumerate(sizes) if n >= low and (high is None or n <= high)]
        buckets[label] = {"queries": len(members),
                          **{name: float(np.mean([scores[name][i] for i in members])) if members else None
                             for name in GROUP_METRICS}}
    return {"macro": macro, "by_relevant": buckets}


def finds_others(query_id: str, relevant: Sequence[str]) -> bool:
    """Whether an image query has something to find besides its own product (without_query_products keeps it)."""
    return any(r != query_id for r in relevant)


def without_query_products(ranked: Sequence[Sequence[str]], relevant: Sequence[Sequence[str]],
                           query_ids: Sequence[str], k: int = max(KS)) -> tuple[list[list[str]], list[list[str]]]:
    """Image queries scored on the *other* products: each photo's own product leaves its ranking
    and its relevant set. Finding the product a photo was taken of proves memory, not
    understanding. Queries left with nothing relevant are dropped. Rank k + 1 to keep k.
    """
    out_ranked, out_relevant = [], []
    for ranking, rel, qid in zip(ranked, relevant, query_ids, strict=True):
        if finds_others(qid, rel):
            out_ranked.append([p for p in ranking if p != qid][:k])
            out_relevant.append([r for r in rel if r != qid])
    return out_ranked, out_relevant


def rank(query_embeddings: np.ndarray, product_embeddings: np.ndarray, ids: Sequence[str],
         k: int = 100, chunk: int = 1024) -> list[list[str]]:
    """Exact top-k by inner product (embeddings are unit vectors, so this is cosine)."""
    ids = np.asarray(ids)
    k = min(k, len(ids))
    out = []
    for start in range(0, len(query_embeddings), chunk):
        scores = query_embeddings[start:start + chunk] @ product_embeddings.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        out.extend(ids[np.take_along_axis(top, order, axis=1)].tolist())
    return out


def format_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per (model, query kind)."""
    cols = ["recall@1", "recall@10", "recall@100", "ndcg@10", "mrr@10", "queries"]
    lines = ["| model | queries | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, result in results.items():
        for kind, metrics in result["metrics"].items():
            values = [f"{metrics[c]:.4f}" if isinstance(metrics[c], float) else str(metrics[c]) for c in cols]
            lines.append(f"| {name} | {kind} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def format_groups(results: dict[str, dict]) -> str:
    """Markdown table of grouped_metrics: per (model, query kind), the micro and macro means and each bucket."""
    labels = [label for _, _, label in RELEVANT_BUCKETS]
    lines = ["| model | queries | nDCG@10 micro / macro (looks) | R@100 micro / macro | "
             + " | ".join(f"nDCG@10, {label} relevant" for label in labels) + " |",
             "|---|---|---|---|" + "---|" * len(labels)]
    for name, result in results.items():
        for kind, grouped in result.get("groups", {}).items():
            micro, macro = result["metrics"][kind], grouped["macro"]
            ndcg, recall = (("-", "-") if macro["groups"] == 0 else
                            (f"{macro['ndcg@10']:.3f} ({macro['groups']})", f"{macro['recall@100']:.3f}"))
            cells = [f"{b['ndcg@10']:.3f} ({b['queries']})" if b["queries"] else "-"
                     for b in (grouped["by_relevant"][label] for label in labels)]
            lines.append(f"| {name} | {kind} | {micro['ndcg@10']:.3f} / {ndcg} | "
                         f"{micro['recall@100']:.3f} / {recall} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cosine_stats(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Row-wise cosine of two embedding sets (min / mean) and their largest absolute difference."""
    a, b = got.astype(np.float64), reference.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "max_abs_diff": float(np.abs(a - b).max()), "rows": len(cos)}


def top_k_overlap(queries: np.ndarray, products: np.ndarray, ref_queries: np.ndarray, ref_products: np.ndarray,
                  k: int = 10) -> float:
    """Mean share of each query's reference top k (by inner product) that the other embeddings keep."""
    k = min(k, len(products))
    mine = np.argsort(-(queries @ products.T), axis=1)[:, :k]
    ref = np.argsort(-(ref_queries @ ref_products.T), axis=1)[:, :k]
    return float(np.mean([len(set(m) & set(r)) / k for m, r in zip(mine, ref)]))


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(a)}
