"""Load tests with perf_analyzer: query_encoder and product_encoder, gRPC and HTTP, concurrency sweeps.

Inputs are real: the evaluation set's queries, and catalog products (title, description, JPEG bytes).
Writes bench/results/perf_analyzer.{csv,md,png}. Starts its own Triton on the model repository
unless --url is given.

    python bench/perf.py --model-repository model_repository --concurrency 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import logging
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.catalog import DEFAULT_CATALOG, ImageFetcher, read_catalog  # noqa: E402
from core.queries import DEFAULT_EVAL_SET, QuerySet  # noqa: E402
from export.serve import TritonServer  # noqa: E402

logger = logging.getLogger("bench.perf")
RESULTS = ROOT / "bench" / "results"
MODELS = ("query_encoder", "product_encoder")


def _glibc() -> tuple[int, int]:
    version = platform.libc_ver()[1] or "0.0"
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def locate_perf_analyzer() -> tuple[str, dict]:
    """(binary, environment). Newer perf_analyzer builds need glibc 2.38; the one tritonclient 2.51 ships
    runs on 2.34+ with Debian's libb64-0d and a libcudart.so.12 (nvidia-cuda-runtime-cu12, bench extra)."""
    env = dict(os.environ)
    candidates = []
    if _glibc() >= (2, 38) and shutil.which("perf_analyzer"):
        candidates.append(shutil.which("perf_analyzer"))
    candidates.append(str(Path(sys.executable).parent / "perf_analyzer"))
    try:
        import nvidia.cuda_runtime  # noqa: F401  (namespace package: no __file__)

        libdirs = [str(Path(p) / "lib") for p in nvidia.cuda_runtime.__path__]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libdirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    except ImportError:
        pass
    problems = []
    for binary in candidates:
        if not Path(binary).exists():
            continue
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, env=env)
        if result.returncode == 0:
            return binary, env
        problems.append(f"{binary}: {(result.stderr or result.stdout).strip()[:300]}")
    hint = ("install Debian's libb64-0d (apt-get install libb64-0d) and the bench extra "
            "(pip install -e '.[bench]', which brings libcudart.so.12)")
    major, minor = _glibc()
    raise SystemExit(f"no runnable perf_analyzer (glibc {major}.{minor}): {'; '.join(problems)}\n{hint}")


def _string_b64(data: bytes) -> str:
    """A BYTES element as perf_analyzer wants it in b64: 4-byte little-endian length, then the bytes."""
    return base64.b64encode(struct.pack("<I", len(data)) + data).decode()


def write_input_data(directory: Path, catalog: str, n: int) -> dict[str, Path]:
    queries = QuerySet.load(DEFAULT_EVAL_SET).texts[:n]
    df, _ = read_catalog(catalog, limit=n)
    fetch = ImageFetcher(base_dir=df.attrs.get("base_dir"))
    products = []
    for title, description, image in zip(df["title"], df["description"], df["image"]):
        products.append({"TITLE": {"content": [str(title)], "shape": [1]},
                         "DESCRIPTION": {"content": [str(description or "")], "shape": [1]},
                         "IMAGE": {"content": {"b64": _string_b64(fetch(image))}, "shape": [1]}})
    files = {"query_encoder": write_query_data(directory / "queries.json", queries),
             "product_encoder": directory / "products.json"}
    files["product_encoder"].write_text(json.dumps({"data": products}))
    return files


def write_query_data(path: Path, queries: list[str]) -> Path:
    """perf_analyzer --input-data for query_encoder: one request a query."""
    path.write_text(json.dumps({"data": [{"QUERY": {"content": [q], "shape": [1]}} for q in queries]}))
    return path


def run_sweep(binary: str, env: dict, model: str, protocol: str, url: str, input_data: Path,
              concurrency: list[int], window_ms: int, out_csv: Path, batch_size: int = 1) -> list[dict]:
    """One perf_analyzer run per concurrency level; throughput counts items (batch_size per request)."""
    cmd = [binary, "-m", model, "-i", protocol, "-u", url, "--input-data", str(input_data), "-b", str(batch_size),
           "--concurrency-range", f"{min(concurrency)}:{max(concurrency)}:1" if len(concurrency) > 1
           else str(concurrency[0]),
           "--measurement-interval", str(window_ms), "--stability-percentage", "50", "--max-trials", "10",
           "--percentile", "99", "-f", str(out_csv), "--verbose-csv"]
    if len(concurrency) > 1 and concurrency != list(range(min(concurrency), max(concurrency) + 1)):
        # perf_analyzer's range is arithmetic; run the listed levels one by one instead
        rows = []
        for c in concurrency:
            rows += run_sweep(binary, env, model, protocol, url, input_data, [c], window_ms,
                              out_csv.with_name(f"{out_csv.stem}_c{c}.csv"), batch_size)
        return rows
    logger.info("%s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed for {model}/{protocol}:\n"
                           f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    rows = []
    with open(out_csv) as f:
        for row in csv.DictReader(f):
            rows.append({"model": model, "protocol": protocol, "batch": batch_size,
                         "concurrency": int(row["Concurrency"]),
                         "throughput": float(row["Inferences/Second"]),
                         "p50_ms": float(row["p50 latency"]) / 1000, "p95_ms": float(row["p95 latency"]) / 1000,
                         "p99_ms": float(row["p99 latency"]) / 1000,
                         "server_queue_ms": float(row["Server Queue"]) / 1000,
                         "server_compute_ms": (float(row["Server Compute Input"]) + float(row["Server Compute Infer"])
                                               + float(row["Server Compute Output"])) / 1000})
    return rows


def write_results(rows: list[dict], settings: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "perf_analyzer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# perf_analyzer load tests", "",
             f"`python bench/perf.py {settings['argv']}`. Real inputs: {settings['inputs']}. "
             f"Server: {settings['server']}. Machine: {settings['machine']}.", "",
             "Throughput counts items (queries or products); latencies are per request.", "",
             "| model | protocol | items/request | concurrency | items/s | p50 ms | p95 ms | p99 ms | server queue ms "
             "| server compute ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['protocol']} | {r['batch']} | {r['concurrency']} | {r['throughput']:.1f} | "
                     f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_queue_ms']:.2f} | "
                     f"{r['server_compute_ms']:.2f} |")
    lines += ["", "Batching gain (best throughput / concurrency-1 throughput):", ""]
    for model in sorted({r["model"] for r in rows}):
        for protocol in sorted({r["protocol"] for r in rows}):
            series = [r for r in rows if r["model"] == model and r["protocol"] == protocol]
            if not series:
                continue
            c1 = next((r for r in series if r["concurrency"] == 1), series[0])
            best = max(series, key=lambda r: r["throughput"])
            lines.append(f"- {model} over {protocol}: {best['throughput'] / c1['throughput']:.2f}x "
                         f"({c1['throughput']:.1f} -> {best['throughput']:.1f} infer/s at concurrency "
                         f"{best['concurrency']})")
    (out_dir / "perf_analyzer.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing (bench extra): no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({r["model"] for r in rows}):
        for protocol in sorted({r["protocol"] for r in rows}):
            series = sorted((r for r in rows if r["model"] == model and r["protocol"] == protocol),
                            key=lambda r: r["concurrency"])
            if not series:
                continue
            label = f"{model} ({protocol})"
            axes[0].plot([r["concurrency"] for r in series], [r["throughput"] for r in series], "o-", label=label)
            axes[1].plot([r["throughput"] for r in series], [r["p99_ms"] for r in series], "o-", label=label)
    axes[0].set(xlabel="concurrency", ylabel="inferences/s", title="throughput", xscale="log", yscale="log")
    axes[1].set(xlabel="inferences/s", ylabel="p99 latency (ms)", title="latency vs throughput", xscale="log",
                yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "perf_analyzer.png", dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="repository to serve (ignored with --url)")
    p.add_argument("--url", help="an already running Triton as host:grpc_port,host:http_port (default: start one)")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog whose products become the product inputs")
    p.add_argument("--inputs", type=int, default=200, help="distinct real queries / products in the input data")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated ensembles to load-test")
    p.add_argument("--protocols", default="grpc,http", help="comma-separated: grpc, http")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated concurrency levels")
    p.add_argument("--product-batch", type=int, default=16,
                   help="products per product_encoder request (client/index.py sends 16)")
    p.add_argument("--window-ms", type=int, default=4000, help="perf_analyzer measurement interval per trial")
    p.add_argument("--out", type=Path, default=RESULTS, help="where perf_analyzer.{csv,md,png} go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    binary, env = locate_perf_analyzer()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    server = None
    if args.url:
        grpc_url, http_url = args.url.split(",")
    else:
        server = TritonServer.on_free_ports(args.model_repository,
                                            log_file=Path(tempfile.gettempdir()) / "bench_triton.log")
        server.start()
        grpc_url, http_url = server.grpc_url, f"127.0.0.1:{server.http_port}"
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = write_input_data(Path(tmp), args.catalog, args.inputs)
            for model in args.models.split(","):
                for protocol in args.protocols.split(","):
                    url = grpc_url if protocol == "grpc" else http_url
                    batch = args.product_batch if model == "product_encoder" else 1
                    rows += run_sweep(binary, env, model, protocol, url, files[model], concurrency, args.window_ms,
                                      Path(tmp) / f"{model}_{protocol}.csv", batch)
    finally:
        if server:
            server.stop()
    report = {}
    report_file = Path(args.model_repository) / "export_report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
    settings = {"argv": " ".join(argv if argv is not None else sys.argv[1:]),
                "inputs": f"{args.inputs} evaluation-set queries, {args.inputs} catalog products with their JPEGs",
                "server": f"tritonserver 2.51, {report.get('backend', '?')} flavour, {report.get('variant', '?')} "
                          f"graphs, serving settings {json.dumps(report.get('serving', {}))}",
                "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"}
    write_results(rows, settings, args.out)
    print((args.out / "perf_analyzer.md").read_text())


if __name__ == "__main__":
    main()
