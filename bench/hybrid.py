"""Hybrid retrieval measured: dense vs BM25 vs their fusion, on every query set, served.

    .venv/bin/python bench/hybrid.py --milvus-uri runs/milvus.db     # on what `make demo` built

Every query goes through the served system: Triton embeds it, Milvus searches the collection's
vector and its BM25 field (top 100 each). The fusions are computed from those same two lists, so
they differ only in how they combine them: the shipped one (client/fusion.py), Milvus-style RRF(60)
and fixed weighted sums. Then end-to-end search latency (embed + search + fuse) of the dense and
hybrid modes, interleaved query by query in one run, and the BM25 analyzer choice (standard vs
whitespace + lowercase) on the catalog text. Writes bench/results/hybrid.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import store  # noqa: E402
from client.connection import add_connection_args  # noqa: E402
from client.encoder import TritonEncoder  # noqa: E402
from client.fusion import fuse  # noqa: E402
from client.search import Searcher  # noqa: E402
from core.catalog import DEFAULT_CATALOG, read_catalog  # noqa: E402
from core.metrics import percentiles, retrieval_metrics  # noqa: E402
from core.preprocess import product_text  # noqa: E402
from core.queries import CODES_EVAL_SET, DEFAULT_EVAL_SET, NAMES_EVAL_SET, QuerySet  # noqa: E402

logger = logging.getLogger("bench.hybrid")
RESULTS = ROOT / "bench" / "results"
SETS = {"attributes": DEFAULT_EVAL_SET, "codes": CODES_EVAL_SET, "names": NAMES_EVAL_SET}
K = 100


def rrf(dense, lexical, k: int = 60) -> list[str]:
    scores: dict[str, float] = {}
    for hits in (dense, lexical):
        for r, hit in enumerate(hits):
            scores[hit.product_id] = scores.get(hit.product_id, 0.0) + 1.0 / (k + r + 1)
    return sorted(scores, key=lambda p: -scores[p])


def ids(hits) -> list[str]:
    return [h.product_id for h in hits]


# The collection's metric is IP (the indexer's default), so dense distances are similarities already.
STRATEGIES = {
    "dense": lambda d, lx: ids(d),
    "lexical (BM25)": lambda d, lx: ids(lx),
    "hybrid (shipped: confidence-weighted)": lambda d, lx: ids(fuse(d, lx)),
    "RRF(60)": rrf,
    "weighted 0.3": lambda d, lx: ids(fuse(d, lx, weight=0.3)),
    "weighted 0.5": lambda d, lx: ids(fuse(d, lx, weight=0.5)),
}


def quality(encoder: TritonEncoder, client, collection: str, sets: dict[str, QuerySet]) -> dict:
    out: dict = {}
    index = store.collection_index(client, collection)
    for name, qs in sets.items():
        dense, lexical = [], []
        for s in range(0, len(qs.texts), 32):
            texts = qs.texts[s:s + 32]
            dense += store.search(client, encoder.embed_queries(texts), K, collection, index=index)
            lexical += store.lexical_search(client, texts, K, collection)
        out[name] = {label: retrieval_metrics([fn(d, lx)[:K] for d, lx in zip(dense, lexical)], qs.text_relevant)
                     for label, fn in STRATEGIES.items()}
        logger.info("%s: %s", name, {k: round(v["ndcg@10"], 3) for k, v in out[name].items()})
    return out


def latency(searcher: Searcher, texts: list[str], rounds: int) -> dict:
    samples: dict[str, list[float]] = {"dense": [], "hybrid": []}
    for text in texts[:5]:  # warm-up
        searcher.search(text, k=10, mode="hybrid")
    for _ in range(rounds):
        for text in texts:
            for mode in samples:  # interleaved: both modes see the same machine state
                started = time.perf_counter()
                searcher.search(text, k=10, mode=mode)
                samples[mode].append((time.perf_counter() - started) * 1e3)
    return {mode: percentiles(s) for mode, s in samples.items()}


def analyzers(catalog: str, sets: dict[str, QuerySet]) -> dict:
    """BM25 alone over the catalog text, with each analyzer, in a scratch Milvus Lite."""
    from pymilvus import DataType, Function, FunctionType

    df, _ = read_catalog(catalog)
    rows = [{"product_id": p, "text": product_text(t, d)[:store.TEXT_MAX_LENGTH]}
            for p, t, d in zip(df["product_id"], df["title"], df["description"])]
    out = {}
    for label, params in (("standard (shipped)", store.ANALYZER),
                          ("whitespace + lowercase", {"tokenizer": "whitespace", "filter": ["lowercase"]})):
        with tempfile.TemporaryDirectory() as tmp:
            client = store.connect(str(Path(tmp) / "analyzer.db"))
            schema = client.create_schema(auto_id=False)
            schema.add_field("product_id", DataType.VARCHAR, is_primary=True, max_length=store.ID_MAX_LENGTH)
            schema.add_field("text", DataType.VARCHAR, max_length=store.TEXT_MAX_LENGTH, enable_analyzer=True,
                             analyzer_params=params)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["text"],
                                         output_field_names=["sparse"]))
            index = client.prepare_index_params()
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            client.create_collection("p", schema=schema, index_params=index)
            for s in range(0, len(rows), 5000):
                client.insert("p", rows[s:s + 5000])
            out[label] = {}
            for name, qs in sets.items():
                hits = client.search("p", data=qs.texts, anns_field="sparse", limit=K,
                                     search_params={"metric_type": "BM25"})
                out[label][name] = retrieval_metrics([[h["id"] for h in row] for row in hits], qs.text_relevant)
            client.close()
    return out


def render(result: dict) -> str:
    q, lat, an = result["quality"], result["latency"], result["analyzers"]
    lines = ["# Hybrid retrieval: dense, BM25 and their fusion, served", "",
             f"`{result['command']}`: {result['products']} products in Milvus ({result['index']}), every query "
             "embedded by Triton. Query sets: the committed attribute set (training/eval_sets/fashion.jsonl) and the "
             "exact-match sets written by `python -m training.make_lexical_sets` (model codes, brand + rare title "
             "word; phrasings the training generator never makes). R@1 = the product (any relevant) first.", "",
             "| fusion | codes R@1 | names R@1 | attributes nDCG@10 | attributes R@100 | codes R@10 | names R@10 |",
             "|---|---|---|---|---|---|---|"]
    for label in STRATEGIES:
        c, n, a = q["codes"][label], q["names"][label], q["attributes"][label]
        lines.append(f"| {label} | {c['recall@1']:.3f} | {n['recall@1']:.3f} | {a['ndcg@10']:.3f} | "
                     f"{a['recall@100']:.3f} | {c['recall@10']:.3f} | {n['recall@10']:.3f} |")
    lines += ["", f"## Search latency, end to end (embed + Milvus + fusion), {lat['dense']['n']} searches per mode, "
              "interleaved", "", "| mode | p50 ms | p99 ms | mean ms |", "|---|---|---|---|"]
    lines += [f"| {mode} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['mean_ms']:.2f} |" for mode, v in lat.items()]
    lines.append(f"\nhybrid / dense p99: **{lat['hybrid']['p99_ms'] / lat['dense']['p99_ms']:.2f}x**")
    lines += ["", "## BM25 analyzer (BM25 alone over the catalog text)", "",
              "| analyzer | codes R@1 | names R@1 | attributes nDCG@10 |", "|---|---|---|---|"]
    lines += [f"| {label} | {v['codes']['recall@1']:.3f} | {v['names']['recall@1']:.3f} | "
              f"{v['attributes']['ndcg@10']:.3f} |" for label, v in an.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog the analyzer comparison reads")
    p.add_argument("--latency-queries", type=int, default=100, help="queries timed per mode (from every set)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the latency queries")
    add_connection_args(p)
    args = p.parse_args(argv)
    sets = {name: QuerySet.load(ROOT / path) for name, path in SETS.items()}
    encoder = TritonEncoder(args.triton_url, args.protocol)
    client = store.connect(args.milvus_uri, args.token, args.user, args.password)
    client.load_collection(args.collection)
    searcher = Searcher(encoder, client, args.collection)
    per_set = max(1, args.latency_queries // len(sets))
    texts = [t for qs in sets.values() for t in qs.texts[:per_set]]
    result = {"command": "python bench/hybrid.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "products": store.count(client, args.collection),
              "index": "/".join(store.collection_index(client, args.collection)),
              "quality": quality(encoder, client, args.collection, sets),
              "latency": latency(searcher, texts, args.rounds)}
    client.close()
    result["analyzers"] = analyzers(args.catalog, sets)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hybrid.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "hybrid.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
