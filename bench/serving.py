"""Embedding speed side by side, in one run on the same inputs: PyTorch eager in-process, ONNX Runtime
in-process (each exported variant), and Triton (the served ensembles), plus each tower's FLOPs
against this machine's measured matmul speed.

    python bench/serving.py --checkpoint runs/mm3-concat --model-repository model_repository

Writes bench/results/serving.{md,json,png}. Starts its own Triton on the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.perf import locate_perf_analyzer, run_sweep, write_query_data  # noqa: E402
from client.encoder import TritonEncoder  # noqa: E402
from client.index import text_length  # noqa: E402
from core.catalog import DEFAULT_CATALOG, ImageFetcher, read_catalog  # noqa: E402
from core.metrics import percentiles  # noqa: E402
from core.preprocess import image_to_pixels, product_text  # noqa: E402
from core.queries import DEFAULT_EVAL_SET, QuerySet  # noqa: E402
from export.graphs import graphs_dir_for  # noqa: E402
from export.pipeline import OnnxPipeline  # noqa: E402
from export.serve import TritonServer  # noqa: E402
from training.encode import embed_queries  # noqa: E402
from training.factory import create_model, create_tokenizer, load_checkpoint_config  # noqa: E402

logger = logging.getLogger("bench.serving")
RESULTS = ROOT / "bench" / "results"
PERF = "perf_analyzer ->"  # rows measured with perf_analyzer instead of client/encoder.py
PERF_CONCURRENCY = [1, 4, 8, 16]


def time_each(fn: Callable, items: list, warmup: int = 5) -> dict[str, float]:
    """Latency of fn(item), one call at a time."""
    for item in items[:warmup]:
        fn(item)
    samples = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        samples.append((time.perf_counter() - started) * 1e3)
    return percentiles(samples)


def throughput_batched(fn: Callable, items: list, batch: int, min_s: float = 3.0) -> float:
    """Items per second when fn takes `batch` items per call (in-process batching)."""
    fn(items[:batch])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_s:
        for start in range(0, len(items), batch):
            fn(items[start:start + batch])
            done += len(items[start:start + batch])
    return done / (time.perf_counter() - started)


def throughput_concurrent(make_fn: Callable[[], Callable], items: list, concurrency: int, batch: int = 1,
                          min_s: float = 4.0) -> dict[str, float]:
    """Items per second with `concurrency` clients each sending `batch` items per request, closed loop."""
    fns = [make_fn() for _ in range(concurrency)]
    for fn in fns:
        fn(items[:batch])
    lock, samples, counter = threading.Lock(), [], [0]
    stop = time.perf_counter() + min_s

    def worker(i: int) -> None:
        fn, pos = fns[i], i * batch
        while time.perf_counter() < stop:
            chunk = [items[(pos + j) % len(items)] for j in range(batch)]
            started = time.perf_counter()
            fn(chunk)
            with lock:
                samples.append((time.perf_counter() - started) * 1e3)
                counter[0] += batch
            pos += concurrency * batch

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return {"items_per_s": counter[0] / (time.perf_counter() - started), **percentiles(samples)}


def one_query(embed_queries: Callable) -> Callable:
    return lambda q: embed_queries([q])


def from_rows(embed_products: Callable) -> Callable:
    """(title, description, image) rows -> the embed_products(titles, descriptions, images) call."""
    return lambda rows: embed_products([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


class TorchEager:
    """The naive baseline: the PyTorch towers in-process (HF tokenizer, PIL preprocessing)."""

    def __init__(self, checkpoint: Path):
        self.model = create_model(checkpoint).eval()
        self.tokenizer = create_tokenizer(checkpoint)
        self.image_cfg = load_checkpoint_config(checkpoint)["preprocess_cfg"]["image"]

    def queries(self, texts: list[str]) -> np.ndarray:
        return embed_queries(self.model, self.tokenizer, texts)

    @torch.no_grad()
    def products(self, rows: list[tuple[str, str, bytes]]) -> np.ndarray:
        text = self.tokenizer([product_text(t, d) for t, d, _ in rows], padding=True, truncation=True,
                              max_length=self.model.cfg.text_cfg.max_length, return_tensors="pt")
        if not self.model.cfg.multimodal:
            return self.model.encode_product(text["input_ids"], text["attention_mask"]).numpy()
        pixels = torch.from_numpy(np.stack([image_to_pixels(img, self.image_cfg) for _, _, img in rows]))
        ones = torch.ones(len(rows))
        return self.model.encode_product(text["input_ids"], text["attention_mask"], pixel_values=pixels,
                                         text_mask=ones, image_mask=ones).numpy()


def tower_flops(eager: TorchEager) -> dict[str, float]:
    """FLOPs per item of each tower at the served input sizes (torch's flop counter: matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, model = eager.model.cfg, eager.model
    out = {}
    with torch.no_grad():
        for name, length, fn in (("query_tower", cfg.text_cfg.query_max_length, model.encode_query),
                                 ("text_tower", cfg.text_cfg.max_length, model.encode_product_text)):
            ids = torch.ones((1, length), dtype=torch.long)
            with FlopCounterMode(display=False) as counter:
                fn(ids, torch.ones_like(ids))
            out[name] = counter.get_total_flops()
        if cfg.multimodal:
            size = eager.image_cfg["image_size"]
            with FlopCounterMode(display=False) as counter:
                model.encode_image(torch.zeros((1, 3, size, size)))
            out["image_tower"] = counter.get_total_flops()
    return out


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best / 1e9


def load_inputs(catalog: str, n_queries: int, n_products: int) -> tuple[list[str], list[tuple[str, str, bytes]]]:
    queries = QuerySet.load(DEFAULT_EVAL_SET).texts
    df, _ = read_catalog(catalog, limit=n_products)
    fetch = ImageFetcher(base_dir=df.attrs.get("base_dir"))
    products = [(str(t), str(d or ""), fetch(img)) for t, d, img in zip(df["title"], df["description"], df["image"])]
    products.sort(key=lambda p: text_length(p[0], p[1]))  # the order client/index.py sends them in, for every path
    return queries[:n_queries], products


def run(args: argparse.Namespace) -> dict:
    checkpoint, repo = Path(args.checkpoint), Path(args.model_repository)
    served = json.loads((repo / "export_report.json").read_text())
    queries, products = load_inputs(args.catalog, args.queries, args.products)
    threads = torch.get_num_threads()
    result = {"machine": f"{os.cpu_count()} CPUs ({platform.machine()}), torch threads {threads}",
              "served_variant": served["variant"], "serving": served.get("serving", {}),
              "inputs": {"queries": len(queries), "products": len(products)},
              "query_latency": {}, "query_throughput": {}, "product_throughput": {}}

    eager = TorchEager(checkpoint)
    pipelines = {v: OnnxPipeline(checkpoint, graphs_dir_for(checkpoint) / v) for v in args.variants.split(",")}
    query_fns = {"pytorch eager": one_query(eager.queries)}
    query_fns.update({f"onnxruntime {v}": one_query(p.embed_queries) for v, p in pipelines.items()})

    server = TritonServer.on_free_ports(repo, log_file=Path(tempfile.gettempdir()) / "bench_serving_triton.log")
    server.start()
    try:
        encoder = TritonEncoder(server.grpc_url, "grpc")
        query_fns[f"triton query_encoder ({served['variant']}, grpc)"] = one_query(encoder.embed_queries)
        http = TritonEncoder(f"127.0.0.1:{server.http_port}", "http")
        query_fns[f"triton query_encoder ({served['variant']}, http)"] = one_query(http.embed_queries)
        for name, fn in query_fns.items():
            result["query_latency"][name] = time_each(fn, queries)
            logger.info("query latency %-40s %s", name, result["query_latency"][name])
        # The same server under perf_analyzer (C++ client): what Triton costs without the Python client's own time.
        binary, env = locate_perf_analyzer()
        with tempfile.TemporaryDirectory() as tmp:
            data = write_query_data(Path(tmp) / "queries.json", queries)
            for row in run_sweep(binary, env, "query_encoder", "grpc", server.grpc_url, data, PERF_CONCURRENCY,
                                 3000, Path(tmp) / "query.csv"):
                if row["concurrency"] == 1:
                    result["query_latency"][f"{PERF} query_encoder ({served['variant']}, grpc)"] = {
                        "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"]}
                result["query_throughput"][f"{PERF} query_encoder, concurrency {row['concurrency']}"] = {
                    "items_per_s": row["throughput"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"]}

        # Throughput: in-process at its best batch vs Triton under concurrent single-query requests.
        result["query_throughput"]["pytorch eager (batch 32)"] = {
            "items_per_s": throughput_batched(eager.queries, queries, 32)}
        for v, p in pipelines.items():
            result["query_throughput"][f"onnxruntime {v} (batch 32)"] = {
                "items_per_s": throughput_batched(p.embed_queries, queries, 32)}
        for c in PERF_CONCURRENCY:
            result["query_throughput"][f"triton query_encoder, concurrency {c}"] = throughput_concurrent(
                lambda: TritonEncoder(server.grpc_url, "grpc").embed_queries, queries, c)
        for name, value in result["query_throughput"].items():
            logger.info("query throughput %-40s %.1f/s", name, value["items_per_s"])

        batch = args.product_batch
        result["product_throughput"][f"pytorch eager (batch {batch})"] = {
            "items_per_s": throughput_batched(eager.products, products, batch)}
        for v, p in pipelines.items():
            result["product_throughput"][f"onnxruntime {v} (batch {batch})"] = {
                "items_per_s": throughput_batched(from_rows(p.embed_products), products, batch)}

        def product_client():
            return from_rows(TritonEncoder(server.grpc_url, "grpc").embed_products)

        for c, b in ((1, 16), (4, 16), (8, 8)):  # the indexer's default is 4 requests of 16 in flight
            result["product_throughput"][f"triton product_encoder, {c} x {b} in flight"] = throughput_concurrent(
                product_client, products, c, batch=b, min_s=6.0)
        for name, value in result["product_throughput"].items():
            logger.info("product throughput %-40s %.1f/s", name, value["items_per_s"])
    finally:
        server.stop()

    flops = tower_flops(eager)
    gflops = matmul_gflops()
    result["flops"] = {"matmul_gflops": gflops, "towers": {
        name: {"gflop_per_item": f / 1e9, "floor_ms_per_item": f / (gflops * 1e9) * 1e3} for name, f in flops.items()}}
    return result


def summarize(result: dict, argv: str) -> str:
    lat, qtp, ptp = result["query_latency"], result["query_throughput"], result["product_throughput"]
    variant = result["served_variant"]
    ort_same = lat[f"onnxruntime {variant}"]
    eager = lat["pytorch eager"]
    p_eager = next(v for k, v in ptp.items() if k.startswith("pytorch"))["items_per_s"]
    p_triton_name, p_triton = max(((k, v) for k, v in ptp.items() if k.startswith("triton")),
                                  key=lambda kv: kv[1]["items_per_s"])
    targets = []
    for client, prefix in (("client/encoder.py", "triton"), ("perf_analyzer", PERF)):
        triton_c1 = next(v for k, v in lat.items() if k.startswith(prefix) and "grpc" in k)
        sweep = {k: v for k, v in qtp.items() if k.startswith(prefix)}
        c1 = sweep[f"{prefix} query_encoder, concurrency 1"]["items_per_s"]
        best_name, best = max(sweep.items(), key=lambda kv: kv[1]["items_per_s"])
        targets += [f"- Triton query_encoder p50 at concurrency 1 ({client}) / in-process ONNX Runtime ({variant}): "
                    f"{triton_c1['p50_ms'] / ort_same['p50_ms']:.2f}x (target <= 1.5x)",
                    f"- PyTorch eager p50 / Triton p50 ({client}): {eager['p50_ms'] / triton_c1['p50_ms']:.2f}x "
                    f"(target >= 2x)",
                    f"- Triton throughput at the best concurrency / concurrency 1 ({client}): "
                    f"{best['items_per_s'] / c1:.2f}x ({best_name}; target >= 2x)"]
    lines = ["# Serving speed: PyTorch eager vs ONNX Runtime vs Triton", "",
             f"`python bench/serving.py {argv}`; {result['machine']}; inputs: {result['inputs']['queries']} "
             f"evaluation-set queries, {result['inputs']['products']} catalog products with their JPEGs. "
             f"Triton serves the **{variant}** graphs (python-backend flavour); serving settings "
             f"`{json.dumps(result['serving'])}`.", "",
             "## Query embedding, batch 1 (one query at a time)", "",
             "| path | p50 ms | p99 ms |", "|---|---|---|"]
    lines += [f"| {k} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} |" for k, v in lat.items()]
    lines += ["", "## Query throughput", "", "| path | queries/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['items_per_s']:.1f} | {v.get('p50_ms', float('nan')):.2f} | "
              f"{v.get('p99_ms', float('nan')):.2f} |" for k, v in qtp.items()]
    lines += ["", "## Product embedding (indexing)", "", "| path | products/s | p50 ms per request |", "|---|---|---|"]
    lines += [f"| {k} | {v['items_per_s']:.1f} | {v.get('p50_ms', float('nan')):.1f} |" for k, v in ptp.items()]
    lines += ["", "## Physical floor", "",
              f"Measured fp32 matmul: {result['flops']['matmul_gflops']:.1f} GFLOP/s (torch, 1024x1024).", "",
              "| tower | GFLOP per item | floor ms per item |", "|---|---|---|"]
    lines += [f"| {k} | {v['gflop_per_item']:.3f} | {v['floor_ms_per_item']:.3f} |"
              for k, v in result["flops"]["towers"].items()]
    lines += ["", "## Targets", "", *targets,
              f"- Indexing through product_encoder / PyTorch eager batched: {p_triton['items_per_s'] / p_eager:.2f}x "
              f"({p_triton_name}; target >= 2x)"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    lat = result["query_latency"]
    axes[0].barh(list(lat), [v["p50_ms"] for v in lat.values()], xerr=None, color="tab:blue", label="p50")
    axes[0].barh(list(lat), [v["p99_ms"] - v["p50_ms"] for v in lat.values()], left=[v["p50_ms"] for v in lat.values()],
                 color="tab:orange", alpha=0.5, label="p99")
    axes[0].set(xlabel="ms", title="query embedding latency, batch 1")
    axes[0].legend()
    ptp = result["product_throughput"]
    axes[1].barh(list(ptp), [v["items_per_s"] for v in ptp.values()], color="tab:green")
    axes[1].set(xlabel="products/s", title="product embedding throughput")
    for ax in axes:
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="runs/mm3-concat", help="checkpoint directory (with onnx/<variant>/)")
    p.add_argument("--model-repository", default="model_repository", help="the exported repository Triton serves")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog the product inputs come from")
    p.add_argument("--queries", type=int, default=300, help="evaluation-set queries to time")
    p.add_argument("--products", type=int, default=256, help="catalog products to embed")
    p.add_argument("--product-batch", type=int, default=32, help="in-process product batch size")
    p.add_argument("--variants", default="fp32,optimized,int8", help="ONNX variants to run in-process")
    p.add_argument("--out", type=Path, default=RESULTS, help="where serving.{md,json,png} go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    text = summarize(result, " ".join(argv if argv is not None else sys.argv[1:]))
    (args.out / "serving.md").write_text(text)
    plot(result, args.out / "serving.png")
    print(text)


if __name__ == "__main__":
    main()
