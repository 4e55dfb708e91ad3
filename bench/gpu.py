"""The exported graphs on ONNX Runtime's CUDA execution provider: parity with FP32 on the CPU, and speed.

The GPU machine is bare and offline, so the work is split in two:
    # here, on the CPU: real inputs, FP32 CPU reference outputs, and the FP32 graphs packed for transport
    .venv/bin/python bench/gpu.py prepare --checkpoint runs/mm3-concat --out .stage/bundle
    # on the GPU machine, with onnxruntime-gpu (no torch needed): FP16 graphs, parity, speed
    python3 bench/gpu.py run --bundle /tmp/work/bundle --out "$OUT"

All of it is the project's own code: core.preprocess inputs, export.pipeline.GraphRunner (query tower;
product = fusion(text_tower, image_tower), by run() or IOBinding), export.variants.to_fp16, core.metrics.
Graph weights travel in one shared file (the query and text towers share their encoder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import external_data_helper  # noqa: E402

from core import specs  # noqa: E402
from core.metrics import cosine_stats, percentiles, top_k_overlap  # noqa: E402
from core.preprocess import tokenize  # noqa: E402
from core.queries import DEFAULT_EVAL_SET, QuerySet  # noqa: E402
from export.pipeline import LEVELS, PROVIDERS, GraphRunner, OnnxPipeline  # noqa: E402

logger, RESULTS = logging.getLogger("bench.gpu"), ROOT / "bench" / "results"
GRAPHS = (specs.QUERY_TOWER, specs.TEXT_TOWER, specs.IMAGE_TOWER, specs.FUSION, specs.IMAGE_QUERY_HEAD)
WEIGHTS, INPUTS = "weights.bin", "inputs.npz"
QUERY_KEYS = (specs.INPUT_IDS, specs.ATTENTION_MASK)  # stored with a "q_" prefix
PRODUCT_KEYS = (specs.INPUT_IDS, specs.ATTENTION_MASK, specs.PIXEL_VALUES, specs.TEXT_MASK, specs.IMAGE_MASK)
OUTPUTS = {specs.QUERY_EMBEDDING: "query_tower", specs.TEXT_EMBEDDING: "text_tower",
           specs.IMAGE_EMBEDDING: "image_tower", specs.PRODUCT_EMBEDDING: "product = fusion(text, image)",
           specs.IMAGE_QUERY_EMBEDDING: "image query = image_query_head(image_tower)"}


def pack_graphs(src: Path, dst: Path, min_bytes: int = 1024, align: int = 4096) -> dict[str, int]:
    """Copy the graphs to `dst/`, every initializer of >= min_bytes stored once in `dst/weights.bin`."""
    dst.mkdir(parents=True, exist_ok=True)
    offsets: dict[str, int] = {}
    with open(dst / WEIGHTS, "wb") as blob:
        for name in GRAPHS:
            model = onnx.load(str(src / f"{name}.onnx"))
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < min_bytes:
                    continue
                key = hashlib.sha256(tensor.raw_data).hexdigest()
                if key not in offsets:
                    blob.write(b"\0" * (-blob.tell() % align))
                    offsets[key] = blob.tell()
                    blob.write(tensor.raw_data)
                external_data_helper.set_external_data(tensor, WEIGHTS, offset=offsets[key],
                                                       length=len(tensor.raw_data))
                tensor.ClearField("raw_data")
            (dst / f"{name}.onnx").write_bytes(model.SerializeToString())
    for name in GRAPHS:  # the packed graph must hold exactly the original weights
        a, b = onnx.load(str(src / f"{name}.onnx")), onnx.load(str(dst / f"{name}.onnx"))
        for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
            if onnx.numpy_helper.to_array(x).tobytes() != onnx.numpy_helper.to_array(y).tobytes():
                raise RuntimeError(f"packing changed {name}:{x.name}")
    return {"distinct_tensors": len(offsets), "weights_bytes": (dst / WEIGHTS).stat().st_size}


def prepare(args: argparse.Namespace) -> None:
    from core.catalog import DEFAULT_CATALOG, ImageFetcher, read_catalog
    from export.graphs import graphs_dir_for  # torch: here only, never on the GPU machine

    checkpoint, out, catalog = Path(args.checkpoint), Path(args.out), args.catalog or DEFAULT_CATALOG
    fp32 = graphs_dir_for(checkpoint, args.graphs_root) / "fp32"
    pipe = OnnxPipeline(checkpoint, fp32, args.threads, pad_to_longest=False)  # as the GPU flavour pads
    queries = QuerySet.load(args.query_set).texts[:args.queries]
    df, _ = read_catalog(catalog, limit=2 * args.products)
    fetch = ImageFetcher(base_dir=df.attrs.get("base_dir"))
    rows = [(str(t), str(d or ""), fetch(i)) for t, d, i in zip(df["title"], df["description"], df["image"])
            if i is not None][:args.products]
    titles, descriptions, images = (list(col) for col in zip(*rows))
    q = dict(zip(QUERY_KEYS, tokenize(pipe.query_tokenizer, queries)))
    p = pipe.product_feeds(titles, descriptions, images)
    parts: dict = {}
    ref = {specs.QUERY_EMBEDDING: pipe.graphs.query(q), specs.PRODUCT_EMBEDDING: pipe.graphs.products(p, parts=parts),
           **parts, specs.IMAGE_QUERY_EMBEDDING: pipe.embed_images(images)}
    served = OnnxPipeline(checkpoint, fp32, threads=args.threads)  # padding to the longest text changes nothing
    for key, value in ((specs.QUERY_EMBEDDING, served.embed_queries(queries)),
                       (specs.PRODUCT_EMBEDDING, served.embed_products(titles, descriptions, images))):
        np.testing.assert_allclose(ref[key], value, rtol=0, atol=1e-5, err_msg=key)
    meta = {"checkpoint": str(checkpoint), "graphs": str(fp32), "catalog": os.path.relpath(catalog),
            "query_set": os.path.relpath(args.query_set), "queries": len(queries), "products": len(rows),
            "reference": f"onnxruntime {ort.__version__} CPUExecutionProvider, FP32, {platform.machine()}"}
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / INPUTS, **{f"q_{k}": v for k, v in q.items()}, **p,
                        **{f"ref_{k}": v for k, v in ref.items()}, meta=np.asarray(json.dumps(meta)))
    logger.info("wrote %s; packed graphs: %s", out / INPUTS, pack_graphs(fp32, out / "graphs"))


def chunks(data: dict, keys: tuple[str, ...], batch: int, prefix: str = "") -> list[dict]:
    """The stored rows in chunks of `batch`, wrapping around when there are fewer rows than a batch."""
    n, starts = len(data[prefix + keys[0]]), range(0, max(len(data[prefix + keys[0]]), batch), batch)
    return [{k: data[prefix + k][np.arange(s, s + batch) % n] for k in keys} for s in starts]


def parity(runner: GraphRunner, data: dict, batch: int) -> dict:
    got: dict[str, list] = {k: [] for k in OUTPUTS}
    for feeds in chunks(data, QUERY_KEYS, batch, "q_"):
        got[specs.QUERY_EMBEDDING].append(runner.query(feeds))
    for feeds in chunks(data, PRODUCT_KEYS, batch):
        parts: dict = {}
        got[specs.PRODUCT_EMBEDDING].append(runner.products(feeds, parts=parts))
        for key, value in parts.items():
            got[key].append(value)
        got[specs.IMAGE_QUERY_EMBEDDING].append(runner.image_queries(feeds[specs.PIXEL_VALUES]))
    got = {k: np.concatenate(v)[:len(data[f"ref_{k}"])] for k, v in got.items()}
    result = {k: cosine_stats(got[k], data[f"ref_{k}"]) for k in OUTPUTS}
    q, p = specs.QUERY_EMBEDDING, specs.PRODUCT_EMBEDDING
    result["top10_overlap"] = top_k_overlap(got[q], got[p], data[f"ref_{q}"], data[f"ref_{p}"])
    return result


def timed(fn, items: list, warmup: int, runs: int = 0, min_s: float = 0.0) -> dict:
    """Per-call times of fn(item), cycling through items, for `runs` calls or at least `min_s` seconds."""
    for i in range(warmup):
        fn(items[i % len(items)])
    samples, started = [], time.perf_counter()
    while len(samples) < max(runs, 3) or time.perf_counter() - started < min_s:
        t = time.perf_counter()
        fn(items[len(samples) % len(items)])
        samples.append((time.perf_counter() - t) * 1e3)
    return {**percentiles(samples), "calls_per_s": len(samples) / (time.perf_counter() - started)}


def speed(runner: GraphRunner, data: dict, args: argparse.Namespace) -> dict:
    modes = ["run", "iobinding"] if runner.device == "cuda" and not args.no_iobinding else ["run"]
    out: dict = {"query_latency": {}, "product_throughput": {}}
    for mode in modes:
        bind = mode == "iobinding"
        prep = runner.upload if bind else (lambda x: x)
        queries = [prep(c) for c in chunks(data, QUERY_KEYS, 1, "q_")]
        out["query_latency"][mode] = timed(lambda f, b=bind: runner.query(f, bind=b), queries, args.warmup,
                                           runs=args.latency_runs)
        out["product_throughput"][mode] = {}
        for batch in args.batches:
            items = [prep(c) for c in chunks(data, PRODUCT_KEYS, batch)]
            t = timed(lambda f, b=bind: runner.products(f, bind=b), items, args.warmup_batches,
                      min_s=args.min_seconds)
            out["product_throughput"][mode][str(batch)] = {**t, "items_per_s": t["calls_per_s"] * batch}
        logger.info("%s %s: query %s", runner.device, mode, out["query_latency"][mode])
    return out


def measure(config: str, data: dict, bundle: Path, args: argparse.Namespace) -> dict:
    """One `device:precision[:level]` row: its sessions, parity, then speed."""
    device, precision, level = (config.split(":") + ["all"])[:3]
    graphs = bundle / "graphs"
    if precision == "fp16":
        from export.variants import to_fp16

        graphs = bundle / "fp16"
        for name in GRAPHS:
            if not (graphs / f"{name}.onnx").exists():
                to_fp16(bundle / "graphs" / f"{name}.onnx", graphs / f"{name}.onnx")
    runner = GraphRunner(graphs, device, args.cpu_threads if device == "cpu" else 0, level)
    if any(p[0] != PROVIDERS[device][0] for p in runner.providers.values()):
        raise RuntimeError(f"{config}: sessions run on {runner.providers}, not {PROVIDERS[device][0]} (ONNX Runtime "
                           "falls back to the CPU when the CUDA provider cannot load its libraries)")
    entry = {"providers": runner.providers[specs.QUERY_TOWER], "parity": parity(runner, data, args.parity_batch)}
    return entry if args.parity_only else {**entry, **speed(runner, data, args)}


def run(args: argparse.Namespace) -> dict:
    bundle, out = Path(args.bundle), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(bundle / INPUTS, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    result = {"environment": environment(), "inputs": json.loads(str(data.pop("meta"))), "argv": sys.argv[1:],
              "settings": {k: v for k, v in vars(args).items() if k not in ("bundle", "out", "command")},
              "configs": {}}
    for config in args.configs.split(","):
        if args.isolate:  # a crash in ONNX Runtime (a segfault, say) costs only this row
            with tempfile.TemporaryDirectory() as tmp:
                argv = [a for a in sys.argv[1:] if a != "--isolate"]
                cmd = [sys.executable, __file__, *argv, "--no-isolate", "--configs", config, "--out", tmp]
                try:
                    rc = subprocess.run(cmd, timeout=args.config_timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                written = Path(tmp) / "gpu.json"
                entry = json.loads(written.read_text())["configs"].get(config, {}) if written.exists() else {}
            if rc != 0 and "error" not in entry:
                entry["error"] = ("timed out" if rc == "timeout" else
                                  f"died ({signal.Signals(-rc).name if rc < 0 else f'exit {rc}'})")
        else:
            try:
                entry = measure(config, data, bundle, args)
            except Exception as exc:  # recorded; the other configurations still measure
                logger.exception("%s failed", config)
                entry = {"error": f"{type(exc).__name__}: {exc}"}
        result["configs"][config] = entry
        (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")  # a cut-off run keeps what it measured
    (out / "gpu.md").write_text(render(result))
    return result


def environment() -> dict:
    from onnxruntime.capi import build_and_package_info as build
    env = {"onnxruntime": ort.__version__, "package": getattr(build, "package_name", "?"), "onnx": onnx.__version__,
           "cuda": getattr(build, "cuda_version", None), "providers": ort.get_available_providers(),
           "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        env["gpu"] = subprocess.run(smi, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["gpu"] = f"none ({type(exc).__name__})"
    return env


def render(result: dict) -> str:
    env, inputs, configs = result["environment"], result["inputs"], result["configs"]
    batches = [str(b) for b in result["settings"]["batches"]]
    lines = ["# The ONNX graphs on ONNX Runtime's CUDA execution provider", "",
             f"GPU: **{env['gpu']}**; {env['machine']}; {env['package']} {env['onnxruntime']} (CUDA {env['cuda']}).",
             f"Inputs: {inputs['queries']} queries of {inputs['query_set']}, {inputs['products']} catalog products "
             f"with their JPEGs, through core.preprocess. Graphs: {inputs['graphs']} and FP16 copies "
             f"(export.variants.to_fp16). Reference: {inputs['reference']}.", "",
             "## Parity with FP32 on the CPU (cosine min / mean, max abs)", "",
             "| output | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for key, title in OUTPUTS.items():
        cells = [f"{p['cos_min']:.7f} / {p['cos_mean']:.7f} ({p['max_abs_diff']:.1e})"
                 if (p := c.get("parity", {}).get(key)) else "-" for c in configs.values()]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    overlaps = [f"{c['parity']['top10_overlap']:.3f}" if "parity" in c else "-" for c in configs.values()]
    lines.append("| top-10 overlap | " + " | ".join(overlaps) + " |")
    lines += ["", "## Query tower latency, batch 1 (ms)", "", "| configuration | call | p50 | p99 |",
              "|---|---|---|---|"]
    lines += [f"| {label} | {mode} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} |"
              for label, c in configs.items() for mode, v in c.get("query_latency", {}).items()]
    lines += ["", "## Products per second (text_tower + image_tower + fusion)", "",
              "| configuration | call | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|---|" + "---|" * len(batches)]
    lines += [f"| {label} | {mode} | " + " | ".join(f"{v[b]['items_per_s']:,.0f}" if b in v else "-" for b in batches)
              + " |" for label, c in configs.items() for mode, v in c.get("product_throughput", {}).items()]
    errors = [f"- {label}: `{c['error']}`" for label, c in configs.items() if "error" in c]
    lines += (["", "## Failures", "", *errors] if errors else []) + ["", f"`bench/gpu.py {' '.join(result['argv'])}`"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepare", help="here: inputs, FP32 CPU reference outputs, packed graphs")
    pre.add_argument("--checkpoint", default="runs/mm3-concat", help="checkpoint directory (exported first)")
    pre.add_argument("--graphs-root", default="build/graphs", help="export's --graphs-dir (where its graphs went)")
    pre.add_argument("--catalog", default=None, help="catalog the products come from (default: the fashion catalog)")
    pre.add_argument("--query-set", default=str(DEFAULT_EVAL_SET), help="JSONL query set the queries come from")
    pre.add_argument("--queries", type=int, default=256, help="queries to take (the first ones)")
    pre.add_argument("--products", type=int, default=256, help="products to take (the first with an image)")
    pre.add_argument("--threads", type=int, default=0, help="ONNX Runtime CPU threads for the reference (0: default)")
    pre.add_argument("--out", type=Path, default=Path(".stage/bundle"), help=f"folder for {INPUTS} and graphs/")
    r = sub.add_parser("run", help="on the GPU machine: parity against the reference, then speed")
    r.add_argument("--bundle", type=Path, required=True, help=f"what prepare wrote: {INPUTS} and graphs/")
    r.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu.json and gpu.md")
    r.add_argument("--configs", default="cuda:fp32,cuda:fp16,cpu:fp32",
                   help=f"comma-separated device:precision[:level]: device {list(PROVIDERS)}, precision fp32 or "
                        f"fp16, graph optimization level {list(LEVELS)} (default all)")
    r.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="measure every configuration in this process, not each in a child process")
    r.add_argument("--config-timeout", type=float, default=300.0, help="seconds one configuration may take")
    r.add_argument("--parity-batch", type=int, default=64, help="batch size of the parity runs")
    r.add_argument("--parity-only", action="store_true", help="skip the timings")
    r.add_argument("--latency-runs", type=int, default=300, help="timed batch-1 query calls per configuration")
    r.add_argument("--warmup", type=int, default=30, help="untimed batch-1 query calls first")
    r.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default="16,64,256",
                   help="comma-separated product batch sizes to time")
    r.add_argument("--min-seconds", type=float, default=3.0, help="time each product batch size for at least this")
    r.add_argument("--warmup-batches", type=int, default=3, help="untimed product calls first, per batch size")
    r.add_argument("--cpu-threads", type=int, default=0, help="intra-op threads of cpu rows (0: ORT's default)")
    r.add_argument("--no-iobinding", action="store_true", help="time only plain run() calls on CUDA")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    arguments = parse_args()
    {"prepare": prepare, "run": run}[arguments.command](arguments)
