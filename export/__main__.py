"""Export a checkpoint to ONNX, check it against PyTorch, and write a Triton model repository.

    python -m export --checkpoint runs/mm3-concat --out model_repository --backend python
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from core.catalog import DEFAULT_CATALOG, ColumnMap
from core.specs import QUERY_ENCODER, model_name, report_file
from training.factory import create_model, create_tokenizer, load_checkpoint_config

from .graphs import GRAPHS_ROOT, export_graph, graph_specs, graphs_dir_for
from .parity import Rows, graph_parity, pipeline_quality, torch_reference
from .repository import BACKENDS, ServingCfg, write_repository
from .variants import QUALITY_BOUND, VARIANTS, build_variant

logger = logging.getLogger("export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint directory (python -m training.train --out)")
    p.add_argument("--out", default="model_repository", help="Triton model repository to write (replaced)")
    p.add_argument("--backend", choices=BACKENDS, default="python",
                   help="python: graphs run by ONNX Runtime in Python-backend models (CPU, local server); "
                        "onnxruntime: Triton's onnxruntime backend on GPU with the TensorRT accelerator; "
                        "tensorrt: tensorrt_plan models whose engines docker/build_engines.py builds on the GPU")
    p.add_argument("--variant", choices=("auto", *VARIANTS), default="auto",
                   help="graphs to serve; auto = int8 on CPU if it meets the quality bound "
                        f"{QUALITY_BOUND}, else optimized; fp32 on GPU (TensorRT makes FP16 engines)")
    p.add_argument("--measure", default="fp32,optimized,int8",
                   help="comma-separated variants to build and measure against PyTorch (fp16 is for GPUs: "
                        "on CPU, ONNX Runtime may refuse or crash on FP16 ViT graphs, which is then recorded)")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog whose real rows drive the parity checks")
    p.add_argument("--parity-rows", type=int, default=64, help="catalog rows used for parity and quality checks")
    p.add_argument("--max-batch-size", type=int, default=ServingCfg.max_batch_size,
                   help="max_batch_size of every model")
    p.add_argument("--tower-instances", type=int, default=ServingCfg.tower_instances,
                   help="instances of each product-side tower model (text, image, fusion, image-query head)")
    p.add_argument("--query-tower-instances", type=int, default=ServingCfg.query_tower_instances,
                   help="instances of the query tower")
    p.add_argument("--query-intra-op-threads", type=int, default=ServingCfg.query_intra_op_threads,
                   help="python backend: ONNX Runtime intra-op threads of the query tower (0 = all cores)")
    p.add_argument("--intra-op-threads", type=int, default=ServingCfg.intra_op_threads,
                   help="python backend: ONNX Runtime intra-op threads per product-side tower instance (0 = all cores)")
    p.add_argument("--query-queue-delay-us", type=int, default=ServingCfg.query_queue_delay_us,
                   help="dynamic batching delay of the query path (latency-bound)")
    p.add_argument("--product-queue-delay-us", type=int, default=ServingCfg.product_queue_delay_us,
                   help="dynamic batching delay of the product and image path (throughput-bound)")
    p.add_argument("--tag", default="",
                   help="write the models as a separate model set (query_encoder__TAG, ...) beside the ones the "
                        "repository holds: a running Triton serves both during an upgrade (client/upgrade.py)")
    p.add_argument("--force", action="store_true", help="re-export the ONNX graphs even if they are up to date")
    p.add_argument("--graphs-dir", default=str(GRAPHS_ROOT),
                   help="where the ONNX graphs go: <graphs-dir>/<checkpoint name>-<weights digest>/<variant>/")
    ColumnMap.add_arguments(p)
    return p.parse_args(argv)


def export_onnx(checkpoint: Path, measure: list[str], catalog: str, parity_rows: int,
                columns: ColumnMap | None = None, force: bool = False,
                graphs_root: Path = GRAPHS_ROOT) -> tuple[dict, dict, Path]:
    """Export FP32 graphs, check parity, build and measure variants; returns (report, graph specs, graphs dir)."""
    model = create_model(checkpoint, attn_implementation="eager").eval()
    tokenizer = create_tokenizer(checkpoint)
    config = load_checkpoint_config(checkpoint)
    image_cfg = config["preprocess_cfg"]["image"]
    specs = graph_specs(model.cfg, image_cfg["image_size"] if image_cfg else None)
    graphs_dir = graphs_dir_for(checkpoint, graphs_root)  # keyed by the weights' content
    if force:
        shutil.rmtree(graphs_dir, ignore_errors=True)
    for name, spec in specs.items():
        path = graphs_dir / "fp32" / f"{name}.onnx"
        if not path.exists():
            export_graph(model, spec, path)
    rows = Rows.from_catalog(catalog, parity_rows, columns)
    report = {"checkpoint": str(checkpoint), "graphs_dir": str(graphs_dir), "embed_dim": model.cfg.embed_dim,
              "graphs": {n: {"inputs": [vars(t) for t in s.inputs], "outputs": [vars(t) for t in s.outputs]}
                         for n, s in specs.items()},
              "parity_fp32": graph_parity(model, specs, graphs_dir / "fp32", checkpoint, rows, image_cfg),
              "variants": {}}
    reference = torch_reference(model, tokenizer, rows, image_cfg)
    bert = model.query_bert.bert.config
    for variant in measure:
        build_variant(variant, graphs_dir, specs, bert.num_attention_heads, bert.hidden_size)
        try:
            check_loadable(graphs_dir / variant)
            quality = pipeline_quality(reference, checkpoint, graphs_dir / variant, rows)
        except Exception as exc:  # e.g. an FP16 graph that this CPU build of ORT cannot run
            logger.warning("variant %s could not be measured here: %s", variant, exc)
            quality = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        quality["meets_bound"] = all(quality.get(k, 0) >= v for k, v in QUALITY_BOUND.items())
        report["variants"][variant] = quality
        logger.info("variant %-9s %s", variant, json.dumps(quality))
    return report, specs, graphs_dir


def check_loadable(graphs_dir: Path) -> None:
    """Open every graph of a variant in a child process first: a crash there is reported, not fatal."""
    for graph in sorted(graphs_dir.glob("*.onnx")):
        code = ("import onnxruntime as ort, sys; "
                "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])")
        result = subprocess.run([sys.executable, "-c", code, str(graph)], capture_output=True, text=True)
        if result.returncode != 0:
            why = f"signal {-result.returncode}" if result.returncode < 0 else result.stderr.strip()[-200:]
            raise RuntimeError(f"ONNX Runtime (CPU) cannot load {graph.name}: {why}")


def choose_variant(requested: str, backend: str, report: dict) -> str:
    if requested != "auto":
        return requested
    if backend != "python":  # GPU flavours: TensorRT builds FP16 engines from the FP32 graph
        return "fp32"
    int8 = report["variants"].get("int8", {})
    return "int8" if int8.get("meets_bound") else "optimized"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("export").setLevel(logging.INFO)
    args = parse_args(argv)
    model_name(QUERY_ENCODER, args.tag)  # refuses a malformed tag before any work
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    measure = [v for v in args.measure.split(",") if v]
    variant = args.variant
    if variant not in ("auto", *measure):
        measure.append(variant)
    if variant == "auto" and "int8" not in measure:
        measure.append("int8")
    report, specs, graphs_dir = export_onnx(checkpoint, measure, args.catalog, args.parity_rows,
                                            ColumnMap.from_args(args), args.force, Path(args.graphs_dir))
    report["variant"] = choose_variant(variant, args.backend, report)
    report["backend"] = args.backend
    if not report["variants"].get(report["variant"], {}).get("meets_bound") and args.variant == "auto":
        logger.warning("no variant meets the quality bound %s; serving %s anyway", QUALITY_BOUND, report["variant"])
    serving = ServingCfg(max_batch_size=args.max_batch_size, tower_instances=args.tower_instances,
                         intra_op_threads=args.intra_op_threads, query_tower_instances=args.query_tower_instances,
                         query_intra_op_threads=args.query_intra_op_threads,
                         query_queue_delay_us=args.query_queue_delay_us,
                         product_queue_delay_us=args.product_queue_delay_us)
    previous = out / report_file(args.tag)
    if previous.is_file():  # replace what an earlier export wrote, and only that
        for name in json.loads(previous.read_text()).get("models", []):
            shutil.rmtree(out / name, ignore_errors=True)
    report["models"] = write_repository(out, checkpoint, specs, graphs_dir / report["variant"],
                                        args.backend, serving, args.tag)
    report["tag"] = args.tag
    report["serving"] = {k: v for k, v in vars(serving).items() if k != "extra"}
    previous.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s (%s backend, %s graphs): %s", out, args.backend, report["variant"],
                ", ".join(report["models"]))


if __name__ == "__main__":
    main()
