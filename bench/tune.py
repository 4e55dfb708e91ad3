"""Choose the Triton serving settings by measurement: for each candidate ServingCfg, write the repository
(the same generator as export), start Triton, and load it with perf_analyzer.

    python bench/tune.py --checkpoint runs/mm3-concat

Query path: latency at concurrency 1 and throughput at concurrency 8 of query_encoder. Product path:
products/s of product_encoder with the indexer's request shape (16 products a request, 4 in flight).
Writes bench/results/tuning.{md,json}; the winners become export.repository.ServingCfg's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.perf import locate_perf_analyzer, run_sweep, write_input_data  # noqa: E402
from core.catalog import DEFAULT_CATALOG  # noqa: E402
from export.graphs import graph_specs, graphs_dir_for  # noqa: E402
from export.repository import ServingCfg, write_repository  # noqa: E402
from export.serve import TritonServer  # noqa: E402
from training.factory import get_model_config, load_checkpoint_config  # noqa: E402

logger = logging.getLogger("bench.tune")
RESULTS = ROOT / "bench" / "results"

# Query settings apply to the query tower (and tokenizer); product settings to the product-side towers.
QUERY_GRID = [
    {"query_queue_delay_us": 500, "query_intra_op_threads": 0, "query_tower_instances": 1},
    {"query_queue_delay_us": 0, "query_intra_op_threads": 0, "query_tower_instances": 1},
    {"query_queue_delay_us": 100, "query_intra_op_threads": 0, "query_tower_instances": 1},
    {"query_queue_delay_us": 500, "query_intra_op_threads": 1, "query_tower_instances": 2},
    {"query_queue_delay_us": 500, "query_intra_op_threads": 2, "query_tower_instances": 1},
    {"query_queue_delay_us": 500, "query_intra_op_threads": 0, "query_tower_instances": 1, "preprocess_instances": 2},
    {"query_queue_delay_us": 500, "query_intra_op_threads": 0, "query_tower_instances": 1,
     "query_allow_spinning": True},
]
PRODUCT_GRID = [
    {"product_queue_delay_us": 2000, "intra_op_threads": 0, "tower_instances": 1},  # the first guess
    {"product_queue_delay_us": 0, "intra_op_threads": 0, "tower_instances": 1},
    {"product_queue_delay_us": 0, "intra_op_threads": 0, "tower_instances": 1, "allow_spinning": False},
    {"product_queue_delay_us": 2000, "intra_op_threads": 1, "tower_instances": 2},
    {"product_queue_delay_us": 0, "intra_op_threads": 1, "tower_instances": 2},
    {"product_queue_delay_us": 0, "intra_op_threads": 1, "tower_instances": 3},
    {"product_queue_delay_us": 0, "intra_op_threads": 1, "tower_instances": 2, "preprocess_instances": 2},
    {"product_queue_delay_us": 0, "intra_op_threads": 1, "tower_instances": 2, "allow_spinning": False},
]


def measure(checkpoint: Path, variant: str, settings: dict, model: str, input_data: Path, binary: str, env: dict,
            tmp: Path, window_ms: int) -> dict:
    config = load_checkpoint_config(checkpoint)
    image = config["preprocess_cfg"]["image"]
    specs = graph_specs(get_model_config(checkpoint), image["image_size"] if image else None)
    serving = ServingCfg(**settings)
    repo = tmp / f"repo_{abs(hash(json.dumps(settings, sort_keys=True)))}"
    write_repository(repo, checkpoint, specs, graphs_dir_for(checkpoint) / variant, "python", serving)
    server = TritonServer.on_free_ports(repo, log_file=tmp / "tune_triton.log").start()
    try:
        if model == "query_encoder":
            rows = run_sweep(binary, env, model, "grpc", server.grpc_url, input_data, [1], window_ms,
                             tmp / "c1.csv")
            rows += run_sweep(binary, env, model, "grpc", server.grpc_url, input_data, [8], window_ms,
                              tmp / "c8.csv")
            return {"settings": settings, "p50_ms_c1": rows[0]["p50_ms"], "p99_ms_c1": rows[0]["p99_ms"],
                    "qps_c1": rows[0]["throughput"], "qps_c8": rows[1]["throughput"], "p99_ms_c8": rows[1]["p99_ms"]}
        rows = run_sweep(binary, env, model, "grpc", server.grpc_url, input_data, [4], window_ms, tmp / "p4.csv",
                         batch_size=16)
        return {"settings": settings, "products_per_s": rows[0]["throughput"], "p50_ms": rows[0]["p50_ms"],
                "p99_ms": rows[0]["p99_ms"]}
    finally:
        server.stop()


def summarize(result: dict, argv: str) -> str:
    lines = ["# Triton serving settings, tuned by measurement", "",
             f"`python bench/tune.py {argv}`; {result['variant']} graphs, python-backend flavour, perf_analyzer over "
             "gRPC with real inputs. Settings not listed keep `ServingCfg`'s defaults of that run (below).", "",
             "## Query path (query_encoder, one query a request)", "",
             "| settings | p50 ms (c=1) | p99 ms (c=1) | queries/s (c=1) | queries/s (c=8) | p99 ms (c=8) |",
             "|---|---|---|---|---|---|"]
    for r in result["query"]:
        lines.append(f"| `{json.dumps(r['settings'])}` | {r['p50_ms_c1']:.2f} | {r['p99_ms_c1']:.2f} | "
                     f"{r['qps_c1']:.1f} | {r['qps_c8']:.1f} | {r['p99_ms_c8']:.2f} |")
    lines += ["", "## Product path (product_encoder, 16 products a request, 4 requests in flight)", "",
              "| settings | products/s | p50 ms a request | p99 ms a request |", "|---|---|---|---|"]
    for r in result["product"]:
        lines.append(f"| `{json.dumps(r['settings'])}` | {r['products_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} |")
    lines += ["", f"ServingCfg defaults during this run: `{json.dumps(result['defaults'])}`"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="runs/mm3-concat", help="checkpoint with exported onnx/<variant>/ graphs")
    p.add_argument("--variant", default="int8", help="graph variant to serve")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog for the product inputs")
    p.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer measurement window")
    p.add_argument("--paths", default="query,product", help="which grids to run")
    p.add_argument("--out", type=Path, default=RESULTS, help="where tuning.{md,json} go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    binary, env = locate_perf_analyzer()
    defaults = {f.name: f.default for f in dataclasses.fields(ServingCfg) if f.default is not dataclasses.MISSING}
    result = {"variant": args.variant, "defaults": {k: v for k, v in defaults.items() if not isinstance(v, dict)},
              "query": [], "product": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_input_data(Path(tmp), args.catalog, 200)
        for path, grid, model in (("query", QUERY_GRID, "query_encoder"), ("product", PRODUCT_GRID, "product_encoder")):
            if path not in args.paths.split(","):
                continue
            for settings in grid:
                row = measure(Path(args.checkpoint), args.variant, settings, model, files[model], binary, env,
                              Path(tmp), args.window_ms)
                logger.info("%s %s", path, row)
                result[path].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuning.json").write_text(json.dumps(result, indent=2) + "\n")
    text = summarize(result, " ".join(argv if argv is not None else sys.argv[1:]))
    (args.out / "tuning.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
