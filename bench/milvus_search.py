"""Milvus top-10 latency and recall (vs exact brute force) at the catalog's size and at 1M vectors, for
each index type Milvus Lite builds; plus the end-to-end search path (Triton embed + Milvus top-10).

    python bench/milvus_search.py --milvus-uri runs/milvus.db --sizes 44072,1000000

The vectors are real: the indexed catalog's product embeddings, read back from the collection that
client/index.py filled. 1M is those vectors replicated with small Gaussian perturbations (each copy
renormalized), which keeps their clustering. Queries are the evaluation set's, embedded by the
served model through Triton. Writes bench/results/milvus.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from client import store  # noqa: E402
from client.encoder import TritonEncoder  # noqa: E402
from client.search import Searcher  # noqa: E402
from core.queries import DEFAULT_EVAL_SET, QuerySet  # noqa: E402
from export.serve import TritonServer  # noqa: E402

logger = logging.getLogger("bench.milvus")
RESULTS = ROOT / "bench" / "results"
LITE_INDEXES = {"FLAT": ({}, {}), "IVF_FLAT": ({"nlist": 1024}, {"nprobe": 32}), "AUTOINDEX": ({}, {})}


def read_vectors(client, collection: str) -> np.ndarray:
    vectors = []
    iterator = client.query_iterator(collection, batch_size=5000, filter="", output_fields=[store.VECTOR])
    with tqdm(desc="reading vectors", unit="vec") as bar:
        while rows := iterator.next():
            vectors += [r[store.VECTOR] for r in rows]
            bar.update(len(rows))
    iterator.close()
    return np.asarray(vectors, dtype=np.float32)


def grow(base: np.ndarray, size: int, sigma: float, seed: int = 0) -> np.ndarray:
    """`size` unit vectors: the base ones, then perturbed copies of them."""
    rng = np.random.default_rng(seed)
    parts, have = [base[:size]], min(len(base), size)
    while have < size:
        take = base[: size - have]
        noisy = take + rng.normal(0.0, sigma, take.shape).astype(np.float32)
        parts.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
        have += len(take)
    return np.concatenate(parts)


def exact_top(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    out = []
    for start in range(0, len(queries), 64):
        scores = queries[start:start + 64] @ vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out.append(top)
    return np.concatenate(out)


def bench_index(uri: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, index_type: str,
                k: int = 10, insert_batch: int = 2000) -> dict:
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri)
    name = f"bench_{index_type.lower()}"
    if client.has_collection(name):
        client.drop_collection(name)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
    client.create_collection(name, schema=schema)
    started = time.perf_counter()
    for start in tqdm(range(0, len(vectors), insert_batch), desc=f"insert {index_type}", unit="batch"):
        chunk = vectors[start:start + insert_batch]
        client.insert(name, [{"id": start + i, "vector": v} for i, v in enumerate(chunk.tolist())])
    insert_s = time.perf_counter() - started
    build_params, search_params = LITE_INDEXES[index_type]
    index = client.prepare_index_params()
    index.add_index("vector", index_type=index_type, metric_type=store.METRIC, params=build_params)
    started = time.perf_counter()
    client.create_index(name, index)
    client.load_collection(name)
    build_s = time.perf_counter() - started
    params = {"metric_type": store.METRIC, "params": search_params}
    for q in queries[:5]:
        client.search(name, data=[q.tolist()], limit=k, search_params=params)
    latencies, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = client.search(name, data=[q.tolist()], limit=k, search_params=params)[0]
        latencies.append((time.perf_counter() - t0) * 1e3)
        found.append([h["id"] for h in hits])
    recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
    client.drop_collection(name)
    client.close()
    return {"index": index_type, "params": {**build_params, **search_params}, "vectors": len(vectors),
            "insert_s": insert_s, "insert_per_s": len(vectors) / insert_s, "build_load_s": build_s,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "recall@10": recall}


def end_to_end(server: TritonServer, uri: str, queries: list[str]) -> dict:
    """The search.py path: embed through Triton, top-10 from the indexed collection, scalar fields returned."""
    searcher = Searcher(TritonEncoder(server.grpc_url, "grpc"), store.connect(uri))
    for q in queries[:5]:
        searcher.search(q, k=10)
    total, embed, search = [], [], []
    for q in queries:
        t0 = time.perf_counter()
        result = searcher.search(q, k=10)
        total.append((time.perf_counter() - t0) * 1e3)
        embed.append(result.embed_ms)
        search.append(result.search_ms)
    pct = {name: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99))}
           for name, v in (("total", total), ("embed", embed), ("milvus", search))}
    return {"queries": len(queries), "collection_load_ms": searcher.load_ms, **pct}


def summarize(result: dict, argv: str) -> str:
    e2e = result["end_to_end"]
    lines = ["# Milvus Lite: index types at the catalog's size and at 1M; the end-to-end search path", "",
             f"`python bench/milvus_search.py {argv}`; {result['queries']} evaluation-set queries embedded by "
             f"Triton; vectors {result['dim']}-d from the indexed catalog ({result['base']} real), grown by "
             f"perturbed copies (sigma {result['sigma']}) for the larger sizes; recall@10 against exact "
             "brute force (numpy).", "",
             "## End to end (client/search.py path: Triton query_encoder + Milvus top-10 with fields)", "",
             f"On the indexed catalog ({result['catalog_products']} products, AUTOINDEX); the collection is loaded "
             f"once per process ({e2e['collection_load_ms']:.0f} ms).", "",
             "| part | p50 ms | p99 ms |", "|---|---|---|"]
    lines += [f"| {part} | {e2e[part]['p50_ms']:.2f} | {e2e[part]['p99_ms']:.2f} |"
              for part in ("embed", "milvus", "total")]
    lines += ["", "## Index types", "",
              "| vectors | index | params | insert/s | build+load s | top-10 p50 ms | top-10 p99 ms | recall@10 |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["indexes"]:
        lines.append(f"| {r['vectors']:,} | {r['index']} | {json.dumps(r['params'])} | {r['insert_per_s']:.0f} | "
                     f"{r['build_load_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['recall@10']:.4f} |")
    lines += ["", "HNSW is what Milvus standalone/cluster use (docker/); Milvus Lite 2.5 builds only FLAT, IVF_FLAT "
              "and AUTOINDEX."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--milvus-uri", default=store.DEFAULT_URI, help="the Milvus Lite file client/index.py filled")
    p.add_argument("--collection", default=store.COLLECTION, help="collection holding the catalog's vectors")
    p.add_argument("--model-repository", default="model_repository", help="repository Triton serves")
    p.add_argument("--sizes", default="44072,1000000", help="comma-separated collection sizes to test")
    p.add_argument("--indexes", default=",".join(LITE_INDEXES), help="comma-separated index types")
    p.add_argument("--queries", type=int, default=200, help="evaluation-set queries")
    p.add_argument("--sigma", type=float, default=0.02, help="per-dimension noise of the replicated vectors")
    p.add_argument("--work-dir", type=Path, default=None, help="where the benchmark's Lite files go (default: temp)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where milvus.{md,json} go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    texts = QuerySet.load(DEFAULT_EVAL_SET).texts
    texts = texts[: args.queries]
    catalog_client = store.connect(args.milvus_uri)
    base = read_vectors(catalog_client, args.collection)
    catalog_client.close()
    server = TritonServer.on_free_ports(args.model_repository,
                                        log_file=Path(tempfile.gettempdir()) / "bench_milvus_triton.log")
    server.start()
    try:
        encoder = TritonEncoder(server.grpc_url, "grpc")
        queries = np.concatenate([encoder.embed_queries(texts[i:i + 32]) for i in range(0, len(texts), 32)])
        queries = queries.astype(np.float32)
        e2e = end_to_end(server, args.milvus_uri, texts)
    finally:
        server.stop()
    result = {"queries": len(texts), "dim": base.shape[1], "base": len(base), "sigma": args.sigma,
              "catalog_products": len(base), "end_to_end": e2e, "indexes": []}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="milvus_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            vectors = grow(base, size, args.sigma)
            truth = exact_top(queries, vectors, 10)
            for index_type in args.indexes.split(","):
                uri = str(work / f"bench_{size}_{index_type.lower()}.db")
                row = bench_index(uri, vectors, queries, truth, index_type)
                logger.info("%s", row)
                result["indexes"].append(row)
                (args.out / "milvus.json").write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = summarize(result, " ".join(argv if argv is not None else sys.argv[1:]))
    (args.out / "milvus.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
