"""The exported graphs on ONNX Runtime's CUDA execution provider: parity with FP32 on the CPU, and speed.

The GPU machine is bare and offline, so the work is split in two:

    # here, on the CPU: real inputs, FP32 CPU reference outputs, and the FP32 graphs packed for transport
    .venv/bin/python bench/gpu.py prepare --checkpoint runs/mm3-concat --out .stage/bundle
    # on the GPU machine, with onnxruntime-gpu: FP16 graphs (export.variants.to_fp16), parity, speed
    python3 bench/gpu.py run --bundle /tmp/work/bundle --out "$OUT"

`prepare` tokenizes evaluation-set queries and catalog products and preprocesses their JPEGs with the
project's own code (export.pipeline.OnnxPipeline, training.preprocess), runs the FP32 graphs on ONNX
Runtime's CPU provider as the reference, and saves inputs + reference outputs in `inputs.npz`. It also
writes the FP32 graphs to `graphs/` with their weights in one shared `weights.bin`: the query and text
towers share their text encoder, so the pair travels as ~91 MB instead of ~181 MB.

`run` compares each execution provider + precision against the reference (cosine per row of the
final embeddings: the query tower, and the product as the pipeline computes it, fusion(text_tower,
image_tower)), then times query latency at batch 1 and product throughput at several batch sizes,
with plain `run()` (host arrays in and out) and, on CUDA, with IOBinding (inputs already on the GPU,
the tower outputs stay there, the product embedding comes back to the host). It writes gpu.json and
gpu.md to --out, rewriting gpu.json after each configuration so a cut-off run still leaves results.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import external_data_helper  # noqa: E402

from export.pipeline import OnnxPipeline, session  # noqa: E402
from training.preprocess import image_to_pixels, load_tokenizer, product_text, tokenize  # noqa: E402
from training.queries import DEFAULT_EVAL_SET, QuerySet  # noqa: E402

logger = logging.getLogger("bench.gpu")
RESULTS = ROOT / "bench" / "results"
GRAPHS = ("query_tower", "text_tower", "image_tower", "fusion", "image_query_head")
WEIGHTS = "weights.bin"
INPUTS = "inputs.npz"
# What parity compares: the reference array (in inputs.npz, prefixed "ref_") and what it measures.
OUTPUTS = {
    "query_embedding": "query_tower",
    "text_embedding": "text_tower",
    "image_embedding": "image_tower",
    "product_embedding": "product = fusion(text_tower, image_tower)",
    "image_query_embedding": "image query = image_query_head(image_tower)",
}
PROVIDERS = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu": ["CPUExecutionProvider"]}


# --- prepare (here, on the CPU) --------------------------------------------------------------------


def load_products(catalog: str, n: int) -> list[tuple[str, str, bytes]]:
    """(title, description, image bytes) of the first `n` catalog products that have an image.

    The same reading as bench/serving.py's load_inputs (not imported: that module pulls in torch and
    the Triton client, which the GPU machine does not need).
    """
    from training.catalog import ImageFetcher, read_catalog

    df, _ = read_catalog(catalog, limit=2 * n)
    fetch = ImageFetcher(base_dir=df.attrs.get("base_dir"))
    rows = [(str(t), str(d or ""), fetch(img)) for t, d, img in zip(df["title"], df["description"], df["image"])
            if img is not None]
    if len(rows) < n:
        raise ValueError(f"{catalog}: only {len(rows)} of the first {2 * n} products have an image, need {n}")
    return rows[:n]


def pack_graphs(src: Path, dst: Path, names: Sequence[str] = GRAPHS, min_bytes: int = 1024,
                align: int = 4096) -> dict[str, int]:
    """Copy the graphs `src/<name>.onnx` to `dst/`, every initializer of >= min_bytes in one
    `dst/weights.bin` (ONNX external data), each distinct tensor stored once."""
    dst.mkdir(parents=True, exist_ok=True)
    offsets: dict[str, int] = {}
    stats = {"tensors": 0, "shared_tensors": 0, "graph_bytes": 0}
    with open(dst / WEIGHTS, "wb") as blob:
        for name in names:
            model = onnx.load(str(src / f"{name}.onnx"))
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < min_bytes:
                    continue
                key = hashlib.sha256(tensor.raw_data).hexdigest()
                stats["tensors"] += 1
                if key in offsets:
                    stats["shared_tensors"] += 1
                else:
                    blob.write(b"\0" * (-blob.tell() % align))
                    offsets[key] = blob.tell()
                    blob.write(tensor.raw_data)
                external_data_helper.set_external_data(tensor, WEIGHTS, offset=offsets[key],
                                                       length=len(tensor.raw_data))
                tensor.ClearField("raw_data")
            data = model.SerializeToString()
            (dst / f"{name}.onnx").write_bytes(data)
            stats["graph_bytes"] += len(data)
    stats["weights_bytes"] = (dst / WEIGHTS).stat().st_size
    for name in names:  # the packed graph must hold exactly the original weights
        original, packed = onnx.load(str(src / f"{name}.onnx")), onnx.load(str(dst / f"{name}.onnx"))
        for a, b in zip(original.graph.initializer, packed.graph.initializer, strict=True):
            if a.name != b.name or onnx.numpy_helper.to_array(a).tobytes() != onnx.numpy_helper.to_array(b).tobytes():
                raise RuntimeError(f"packing changed {name}:{a.name}")
    return stats


def prepare(args: argparse.Namespace) -> None:
    from training.catalog import DEFAULT_CATALOG

    checkpoint, out = Path(args.checkpoint), Path(args.out)
    fp32 = checkpoint / "onnx" / "fp32"
    pipe = OnnxPipeline(checkpoint, fp32, threads=args.threads)
    catalog = args.catalog or DEFAULT_CATALOG
    queries = QuerySet.load(args.query_set).texts[:args.queries]
    products = load_products(catalog, args.products)
    titles, descriptions, images = (list(col) for col in zip(*products))
    logger.info("%d queries from %s, %d products from %s", len(queries), args.query_set, len(products), catalog)

    # The graph inputs as the pipeline builds them, padded to the fixed lengths the GPU flavour
    # (Triton's tokenizer models, TensorRT profiles) sends: 16 query tokens, 32 product tokens.
    pre = json.loads((checkpoint / "config.json").read_text())["preprocess_cfg"]
    tokenizer_json = str(checkpoint / pre["tokenizer_dir"] / "tokenizer.json")
    q_ids, q_mask = tokenize(load_tokenizer(tokenizer_json, pre["query_max_length"]), queries)
    texts = [product_text(t, d) for t, d in zip(titles, descriptions)]
    p_ids, p_mask = tokenize(load_tokenizer(tokenizer_json, pre["max_length"]), texts)
    pixels = np.stack([image_to_pixels(data, pipe.image_cfg) for data in images])
    arrays = {
        "query_input_ids": q_ids, "query_attention_mask": q_mask,
        "product_input_ids": p_ids, "product_attention_mask": p_mask, "pixel_values": pixels,
        "text_mask": np.asarray([[1.0 if t else 0.0] for t in texts], dtype=np.float32),
        "image_mask": np.ones((len(images), 1), dtype=np.float32),
    }
    # The reference: the pipeline's FP32 sessions on the CPU, on exactly these tensors.
    started = time.perf_counter()
    runner = ModelRunner.from_sessions("cpu fp32 (reference)", "cpu", pipe.sessions)
    image = runner.run("image_tower", pixel_values=pixels)
    ref = {
        "query_embedding": runner.query(q_ids, q_mask),
        "text_embedding": runner.run("text_tower", input_ids=p_ids, attention_mask=p_mask),
        "image_embedding": image,
        "product_embedding": runner.products(arrays),
        "image_query_embedding": runner.run("image_query_head", image_embedding=image),
    }
    logger.info("reference outputs in %.1f s", time.perf_counter() - started)
    # ... which must be what the pipeline computes from the raw strings and JPEG bytes (its own padding).
    for key, value in (("query_embedding", pipe.embed_queries(queries)),
                       ("product_embedding", pipe.embed_products(titles, descriptions, images)),
                       ("image_query_embedding", pipe.embed_images(images))):
        np.testing.assert_allclose(ref[key], value, rtol=0, atol=1e-5, err_msg=key)

    meta = {"checkpoint": str(checkpoint), "graphs": str(fp32), "catalog": str(catalog),
            "query_set": str(args.query_set), "queries": len(queries), "products": len(products),
            "reference": f"onnxruntime {ort.__version__} CPUExecutionProvider, FP32 graphs, "
                         f"{platform.machine()} {os.cpu_count()} CPUs",
            "preprocess_cfg": json.loads((checkpoint / "config.json").read_text())["preprocess_cfg"]}
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / INPUTS, **arrays, **{f"ref_{k}": v for k, v in ref.items()},
                        query_texts=np.asarray(queries), meta=np.asarray(json.dumps(meta)))
    logger.info("wrote %s (%.1f MB)", out / INPUTS, (out / INPUTS).stat().st_size / 1e6)
    stats = pack_graphs(fp32, out / "graphs")
    logger.info("packed %s -> %s: %s", fp32, out / "graphs", stats)


# --- run (on the GPU machine) ----------------------------------------------------------------------


def fp16_graphs(fp32_dir: Path, fp16_dir: Path) -> str:
    """FP16 copies of every graph, made the way export/ makes the fp16 variant; returns how."""
    if all((fp16_dir / f"{name}.onnx").exists() for name in GRAPHS):
        return f"already in {fp16_dir}"
    try:
        from export.variants import to_fp16
        how = "export.variants.to_fp16 (onnxruntime.transformers.float16, keep_io_types=True)"
    except ImportError as exc:  # export.variants imports torch through export.graphs
        logger.warning("export.variants not importable (%s): converting with the same call directly", exc)
        from onnxruntime.transformers.float16 import convert_float_to_float16

        def to_fp16(src: Path, dst: Path) -> Path:
            dst.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
            return dst

        how = "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True), as export.variants"
    for name in GRAPHS:
        started = time.perf_counter()
        to_fp16(fp32_dir / f"{name}.onnx", fp16_dir / f"{name}.onnx")
        logger.info("fp16 %s in %.1f s (%.1f MB)", name, time.perf_counter() - started,
                    (fp16_dir / f"{name}.onnx").stat().st_size / 1e6)
    return how


class ProviderMissing(RuntimeError):
    """A session did not get the execution provider asked for."""


LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def make_session(path: Path, device: str, threads: int, level: str) -> ort.InferenceSession:
    """export.pipeline.session (ORT_ENABLE_ALL), or the same with another graph optimization level."""
    if level == "all":
        return session(path, threads, PROVIDERS[device])
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=PROVIDERS[device])


@dataclass
class ModelRunner:
    """One execution provider + precision: the five graphs' sessions and the pipeline's calls on them."""

    label: str
    device: str  # "cuda" or "cpu"
    sessions: dict[str, ort.InferenceSession]
    providers: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, label: str, device: str, graphs_dir: Path, threads: int = 0, level: str = "all") -> ModelRunner:
        sessions = {name: make_session(graphs_dir / f"{name}.onnx", device, threads, level) for name in GRAPHS}
        runner = cls.from_sessions(label, device, sessions)
        for name, providers in runner.providers.items():
            if providers[0] != PROVIDERS[device][0]:
                raise ProviderMissing(f"{label}: {name} runs on {providers}, not {PROVIDERS[device][0]} (ONNX Runtime "
                                   f"falls back to the CPU when the CUDA provider cannot load its libraries)")
        return runner

    @classmethod
    def from_sessions(cls, label: str, device: str, sessions: dict[str, ort.InferenceSession]) -> ModelRunner:
        return cls(label, device, sessions, {name: s.get_providers() for name, s in sessions.items()})

    # Plain run(): numpy in, numpy out, as export.pipeline.OnnxPipeline does it.
    def run(self, graph: str, **inputs: np.ndarray) -> np.ndarray:
        return self.sessions[graph].run(None, inputs)[0]

    def query(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.run("query_tower", input_ids=ids, attention_mask=mask)

    def products(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        text = self.run("text_tower", input_ids=batch["product_input_ids"],
                        attention_mask=batch["product_attention_mask"])
        image = self.run("image_tower", pixel_values=batch["pixel_values"])
        return self.run("fusion", text_embedding=text, image_embedding=image, text_mask=batch["text_mask"],
                        image_mask=batch["image_mask"])

    # IOBinding: inputs already on the device, intermediate outputs stay there, the final one comes back.
    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, ort.OrtValue]:
        return {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), self.device, 0) for k, v in arrays.items()}

    def bound(self, graph: str, inputs: dict[str, ort.OrtValue], to_host: bool) -> ort.OrtValue:
        sess = self.sessions[graph]
        binding = sess.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(sess.get_outputs()[0].name, "cpu" if to_host else self.device)
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding.get_outputs()[0]

    def query_bound(self, batch: dict[str, ort.OrtValue]) -> np.ndarray:
        return self.bound("query_tower", {"input_ids": batch["query_input_ids"],
                                          "attention_mask": batch["query_attention_mask"]}, to_host=True).numpy()

    def products_bound(self, batch: dict[str, ort.OrtValue]) -> np.ndarray:
        text = self.bound("text_tower", {"input_ids": batch["product_input_ids"],
                                         "attention_mask": batch["product_attention_mask"]}, to_host=False)
        image = self.bound("image_tower", {"pixel_values": batch["pixel_values"]}, to_host=False)
        return self.bound("fusion", {"text_embedding": text, "image_embedding": image, "text_mask": batch["text_mask"],
                                     "image_mask": batch["image_mask"]}, to_host=True).numpy()


def cosine_stats(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = out.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "max_abs_diff": float(np.abs(a - b).max()), "rows": len(cos)}


def top10_overlap(queries: np.ndarray, products: np.ndarray, ref_queries: np.ndarray,
                  ref_products: np.ndarray) -> float:
    """Mean share of the reference top 10 (query -> products, dot product) that this config keeps."""
    k = min(10, len(products))
    mine = np.argsort(-(queries @ products.T), axis=1)[:, :k]
    ref = np.argsort(-(ref_queries @ ref_products.T), axis=1)[:, :k]
    return float(np.mean([len(set(m) & set(r)) / k for m, r in zip(mine, ref)]))


def parity(runner: ModelRunner, data: dict[str, np.ndarray], batch: int) -> dict:
    """Every output of `runner` on the stored inputs, in batches of `batch`, against the reference."""
    outs: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUTS}
    for s in range(0, len(data["query_input_ids"]), batch):
        outs["query_embedding"].append(runner.query(data["query_input_ids"][s:s + batch],
                                                    data["query_attention_mask"][s:s + batch]))
    for s in range(0, len(data["product_input_ids"]), batch):
        text = runner.run("text_tower", input_ids=data["product_input_ids"][s:s + batch],
                          attention_mask=data["product_attention_mask"][s:s + batch])
        image = runner.run("image_tower", pixel_values=data["pixel_values"][s:s + batch])
        outs["text_embedding"].append(text)
        outs["image_embedding"].append(image)
        outs["product_embedding"].append(runner.run("fusion", text_embedding=text, image_embedding=image,
                                                    text_mask=data["text_mask"][s:s + batch],
                                                    image_mask=data["image_mask"][s:s + batch]))
        outs["image_query_embedding"].append(runner.run("image_query_head", image_embedding=image))
    got = {k: np.concatenate(v) for k, v in outs.items()}
    result = {k: cosine_stats(got[k], data[f"ref_{k}"]) for k in OUTPUTS}
    result["top10_overlap"] = top10_overlap(got["query_embedding"], got["product_embedding"],
                                            data["ref_query_embedding"], data["ref_product_embedding"])
    return result


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(a)}


def latency(fn: Callable, items: list, runs: int, warmup: int) -> dict[str, float]:
    """Per-call latency of fn(item), one call at a time, cycling through `items`."""
    for i in range(warmup):
        fn(items[i % len(items)])
    samples = []
    for i in range(runs):
        started = time.perf_counter()
        fn(items[i % len(items)])
        samples.append((time.perf_counter() - started) * 1e3)
    return percentiles(samples)


def throughput(fn: Callable, chunks: list, batch: int, min_s: float, warmup: int) -> dict[str, float]:
    """Items per second when fn takes one chunk of `batch` items per call, calls back to back."""
    for i in range(warmup):
        fn(chunks[i % len(chunks)])
    samples, started = [], time.perf_counter()
    while time.perf_counter() - started < min_s or len(samples) < 3:
        t = time.perf_counter()
        fn(chunks[len(samples) % len(chunks)])
        samples.append((time.perf_counter() - t) * 1e3)
    elapsed = time.perf_counter() - started
    return {"items_per_s": batch * len(samples) / elapsed, "batch": batch, **percentiles(samples)}


PRODUCT_KEYS = ("product_input_ids", "product_attention_mask", "pixel_values", "text_mask", "image_mask")
QUERY_KEYS = ("query_input_ids", "query_attention_mask")


def chunks_of(data: dict[str, np.ndarray], keys: Sequence[str], batch: int) -> list[dict[str, np.ndarray]]:
    """The stored rows in chunks of `batch` (wrapping around when there are fewer rows than a batch)."""
    n = len(data[keys[0]])
    out = []
    for start in range(0, max(n, batch), batch):
        rows = np.arange(start, start + batch) % n
        out.append({k: data[k][rows] for k in keys})
    return out


def speed(runner: ModelRunner, data: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    modes = ["run", "iobinding"] if runner.device == "cuda" and not args.no_iobinding else ["run"]
    queries = chunks_of(data, QUERY_KEYS, 1)
    result: dict = {"query_latency": {}, "product_throughput": {}}
    for mode in modes:
        if mode == "run":
            fn, items = (lambda q: runner.query(q["query_input_ids"], q["query_attention_mask"])), queries
        else:
            fn, items = runner.query_bound, [runner.upload(q) for q in queries]
        result["query_latency"][mode] = latency(fn, items, args.latency_runs, args.warmup)
        logger.info("%s query latency (%s): %s", runner.label, mode, result["query_latency"][mode])
    for mode in modes:
        result["product_throughput"][mode] = {}
        for batch in args.batches:
            chunks = chunks_of(data, PRODUCT_KEYS, batch)
            if mode == "run":
                fn = runner.products
            else:
                fn, chunks = runner.products_bound, [runner.upload(c) for c in chunks]
            result["product_throughput"][mode][str(batch)] = throughput(fn, chunks, batch, args.min_seconds,
                                                                        args.warmup_batches)
            logger.info("%s products batch %d (%s): %.1f/s", runner.label, batch, mode,
                        result["product_throughput"][mode][str(batch)]["items_per_s"])
    return result


def environment() -> dict:
    from onnxruntime.capi import build_and_package_info as build

    env = {"onnxruntime": ort.__version__, "onnxruntime_package": getattr(build, "package_name", "?"),
           "onnxruntime_cuda_version": getattr(build, "cuda_version", None),
           "available_providers": ort.get_available_providers(), "onnx": onnx.__version__,
           "numpy": np.__version__, "python": platform.python_version(),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=True)
        env["gpu"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["gpu"] = f"none ({type(exc).__name__})"
    return env


@dataclass(frozen=True)
class Config:
    """What one row measures: `device:precision[:level]`, e.g. cuda:fp16 or cuda:fp16:extended."""

    device: str  # cuda or cpu
    precision: str  # fp32 or fp16
    level: str = "all"  # graph optimization level; all is export.pipeline.session's

    @classmethod
    def parse(cls, text: str) -> Config:
        config = cls(*text.split(":"))
        if config.device not in PROVIDERS or config.precision not in ("fp32", "fp16") or config.level not in LEVELS:
            raise argparse.ArgumentTypeError(f"bad configuration {text!r}: expected device:precision[:level] with "
                                             f"device in {list(PROVIDERS)}, precision fp32 or fp16, level in "
                                             f"{list(LEVELS)}")
        return config

    @property
    def label(self) -> str:
        return f"{self.device} {self.precision}" + ("" if self.level == "all" else f" ({self.level} optimizations)")

    def __str__(self) -> str:
        return f"{self.device}:{self.precision}:{self.level}"


def measure(config: Config, data: dict[str, np.ndarray], graphs_dir: Path, args: argparse.Namespace,
            entry: dict, save: Callable[[], None]) -> None:
    """Parity, then speed, of one configuration into `entry`; an exception is recorded there."""
    try:
        started = time.perf_counter()
        threads = args.cpu_threads if config.device == "cpu" else 0
        try:
            runner = ModelRunner.load(config.label, config.device, graphs_dir, threads, config.level)
        except ProviderMissing:
            if config.device != "cuda" or not hasattr(ort, "preload_dlls"):
                raise
            # The CUDA and cuDNN libraries were not found on the loader's path: let ONNX Runtime look
            # for them in the nvidia-* pip packages (those PyTorch brings), then try once more.
            logger.warning("no CUDA provider: trying onnxruntime.preload_dlls()")
            ort.preload_dlls()
            runner = ModelRunner.load(config.label, config.device, graphs_dir, threads, config.level)
            entry["note"] = "CUDA libraries loaded by onnxruntime.preload_dlls()"
        entry["providers"] = runner.providers["query_tower"]
        entry["session_seconds"] = time.perf_counter() - started
        entry["parity"] = parity(runner, data, args.parity_batch)
        logger.info("%s parity: %s", config.label, json.dumps(entry["parity"]))
        save()
        if not args.parity_only:
            entry.update(speed(runner, data, args))
    except Exception as exc:  # record and go on: the other configurations still measure
        logger.exception("%s failed", config.label)
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["error_type"] = type(exc).__name__
    save()


def measure_isolated(config: Config, fp16_dir: Path, args: argparse.Namespace) -> dict:
    """measure() in a child process: a crash in ONNX Runtime (a segfault, say) costs only this row."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, str(Path(__file__).resolve()), "run", "--no-isolate", "--bundle", str(args.bundle),
                "--out", tmp, "--configs", str(config), "--fp16-dir", str(fp16_dir),
                "--parity-batch", str(args.parity_batch), "--latency-runs", str(args.latency_runs),
                "--warmup", str(args.warmup), "--batches", ",".join(map(str, args.batches)),
                "--min-seconds", str(args.min_seconds), "--warmup-batches", str(args.warmup_batches),
                "--cpu-threads", str(args.cpu_threads)]
        argv += ["--parity-only"] * args.parity_only + ["--no-iobinding"] * args.no_iobinding
        try:
            rc = subprocess.run(argv, timeout=args.config_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        written = Path(tmp) / "gpu.json"
        entry = json.loads(written.read_text())["configs"].get(config.label, {}) if written.exists() else {}
    if rc == "timeout":
        entry["error"] = f"no result within --config-timeout {args.config_timeout} s"
    elif rc != 0 and "error" not in entry:
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        entry["error"] = f"the measuring process died ({how}) after {list(entry) or 'nothing'}"
    return entry


def run(args: argparse.Namespace) -> dict:
    bundle, out = Path(args.bundle), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(bundle / INPUTS, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    result = {"environment": environment(), "inputs": json.loads(str(data.pop("meta"))),
              "argv": " ".join(sys.argv[1:]), "settings": {
                  "latency_runs": args.latency_runs, "warmup": args.warmup, "batches": args.batches,
                  "min_seconds": args.min_seconds, "parity_batch": args.parity_batch,
                  "cpu_threads": args.cpu_threads or "onnxruntime default (one per physical core)",
                  "graph_optimization_level": "ORT_ENABLE_ALL (export.pipeline.session) unless a row says"},
              "configs": {}}
    if args.commands:
        result["commands"] = Path(args.commands).read_text()
    logger.info("environment: %s", result["environment"])

    def save() -> None:
        (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")

    graphs = {"fp32": bundle / "graphs", "fp16": Path(args.fp16_dir) if args.fp16_dir else bundle / "fp16"}
    if any(c.precision == "fp16" for c in args.configs):
        try:
            result["environment"]["fp16_conversion"] = fp16_graphs(graphs["fp32"], graphs["fp16"])
        except Exception as exc:
            logger.exception("FP16 conversion failed")
            result["environment"]["fp16_conversion"] = f"failed: {type(exc).__name__}: {exc}"
    queue = list(args.configs)
    while queue:
        config = queue.pop(0)
        if not args.isolate:
            entry = result["configs"].setdefault(config.label, {})
            measure(config, data, graphs[config.precision], args, entry, save)
            continue
        logger.info("measuring %s in a child process", config.label)
        entry = result["configs"][config.label] = measure_isolated(config, graphs["fp16"], args)
        save()
        if "error" in entry:
            logger.error("%s: %s", config.label, entry["error"])
            retry = entry.get("error_type") != ProviderMissing.__name__  # another level won't bring it back
            if retry and args.fallback_level and config.level != args.fallback_level:
                queue.insert(0, Config(config.device, config.precision, args.fallback_level))
    (out / "gpu.md").write_text(render(result))
    return result


# --- the report ------------------------------------------------------------------------------------


def render(result: dict) -> str:
    env, configs, settings = result["environment"], result["configs"], result["settings"]
    inputs = result["inputs"]
    lines = [
        "# The ONNX graphs on ONNX Runtime's CUDA execution provider", "",
        f"GPU: **{env['gpu']}** (nvidia-smi: name, driver, memory); {env['machine']}; "
        f"{env['onnxruntime_package']} {env['onnxruntime']} (built for CUDA {env['onnxruntime_cuda_version']}), "
        f"onnx {env['onnx']}, numpy {env['numpy']}, Python {env['python']}.", "",
        f"Inputs: {inputs['queries']} evaluation-set queries ({inputs['query_set']}) and {inputs['products']} "
        f"catalog products with their JPEGs ({inputs['catalog']}), tokenized and preprocessed by "
        f"training.preprocess as export.pipeline.OnnxPipeline does it. Graphs: {inputs['graphs']} "
        f"(FP32, as the packed copy `prepare` writes: same tensors, weights in one shared file) and their FP16 "
        f"copies made by {env.get('fp16_conversion', '-')}.", "",
        f"Reference: {inputs['reference']}.", "",
        "## Parity with FP32 on the CPU", "",
        "Cosine per row against the reference (min / mean), the largest absolute difference of any "
        f"element, and the share of each query's reference top 10 among the {inputs['products']} products "
        f"that the configuration keeps. Batches of {settings['parity_batch']}.", "",
        "| output | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for key, title in OUTPUTS.items():
        cells = []
        for c in configs.values():
            p = c.get("parity", {}).get(key)
            cells.append(f"{p['cos_min']:.7f} / {p['cos_mean']:.7f} (max abs {p['max_abs_diff']:.1e})" if p else "-")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines.append("| top-10 overlap, queries -> products | " + " | ".join(
        f"{c['parity']['top10_overlap']:.3f}" if "parity" in c else "-" for c in configs.values()) + " |")

    lines += ["", "## Query tower latency, batch 1", "",
              f"{settings['latency_runs']} calls one after another, each a real query (16 tokens), after "
              f"{settings['warmup']} warm-up calls. `run`: `session.run()` with numpy in and out, as the "
              "pipeline calls it; `iobinding`: inputs already on the GPU, the embedding copied back.", "",
              "| configuration | call | p50 ms | p99 ms | mean ms |", "|---|---|---|---|---|"]
    for label, c in configs.items():
        for mode, v in c.get("query_latency", {}).items():
            lines.append(f"| {label} | {mode} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {v['mean_ms']:.3f} |")

    batches = [str(b) for b in settings["batches"]]
    lines += ["", "## Product throughput (text_tower + image_tower + fusion)", "",
              f"Products per second, calls back to back for at least {settings['min_seconds']} s per cell; "
              "text at 32 tokens, images at 64x64. `run`: three `session.run()` calls with numpy in and out, "
              "as the pipeline does it; `iobinding`: the batch already on the GPU, the tower outputs stay "
              "there, the product embeddings are copied back.", "",
              "| configuration | call | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|---|" + "---|" * len(batches)]
    for label, c in configs.items():
        for mode, by_batch in c.get("product_throughput", {}).items():
            lines.append(f"| {label} | {mode} | " + " | ".join(
                f"{by_batch[b]['items_per_s']:,.0f}" if b in by_batch else "-" for b in batches) + " |")

    errors = {label: c["error"] for label, c in configs.items() if "error" in c}
    if errors:
        lines += ["", "## Failures", ""] + [f"- {label}: `{err}`" for label, err in errors.items()]
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2), "```",
              "", "Providers as the sessions report them: " + "; ".join(
                  f"{label}: {', '.join(c.get('providers', ['-']))}" for label, c in configs.items()), "",
              f"`bench/gpu.py {result['argv']}`"]
    if result.get("commands"):
        lines += ["", "## How it ran", "", result["commands"].rstrip()]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> None:
    result = json.loads(Path(args.json).read_text())
    if args.commands:
        result["commands"] = Path(args.commands).read_text()
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.markdown).write_text(render(result))
    logger.info("wrote %s", args.markdown)


# --- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("prepare", help="here, on the CPU: inputs + FP32 CPU reference outputs + packed graphs",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pre.add_argument("--checkpoint", default="runs/mm3-concat",
                     help="checkpoint directory (config.json, tokenizer/, onnx/fp32/)")
    pre.add_argument("--catalog", default=None, help="catalog the products come from (default: the shared fashion "
                                                     "catalog, training.catalog.DEFAULT_CATALOG)")
    pre.add_argument("--query-set", default=str(DEFAULT_EVAL_SET), help="JSONL query set the queries come from")
    pre.add_argument("--queries", type=int, default=256, help="queries to take (the first ones)")
    pre.add_argument("--products", type=int, default=256,
                     help="products to take (the first ones with an image); the largest timed batch reuses them")
    pre.add_argument("--threads", type=int, default=0, help="ONNX Runtime CPU threads for the reference (0: default)")
    pre.add_argument("--out", type=Path, default=Path(".stage/bundle"),
                     help=f"folder for {INPUTS} and graphs/ (the packed FP32 graphs)")

    r = sub.add_parser("run", help="on the GPU machine: parity against the reference, then speed",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--bundle", type=Path, required=True, help=f"what prepare wrote: {INPUTS} and graphs/")
    r.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu.json and gpu.md")
    r.add_argument("--configs", type=lambda s: [Config.parse(c) for c in s.split(",")],
                   default="cuda:fp32,cuda:fp16,cpu:fp32",
                   help="comma-separated device:precision[:level] to measure: device cuda or cpu, precision fp32 "
                        f"or fp16, graph optimization level one of {list(LEVELS)} (default all, as "
                        "export.pipeline.session)")
    r.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="measure every configuration in this process, not each in a child process")
    r.add_argument("--config-timeout", type=float, default=300.0,
                   help="seconds a configuration's child process may take before it is recorded as failed")
    r.add_argument("--fallback-level", default=None, choices=list(LEVELS),
                   help="when a configuration fails, measure it again at this graph optimization level")
    r.add_argument("--fp16-dir", default=None,
                   help="where the FP16 graphs are (made there from graphs/ if missing; default: <bundle>/fp16)")
    r.add_argument("--parity-batch", type=int, default=64, help="batch size of the parity runs")
    r.add_argument("--parity-only", action="store_true", help="skip the timings")
    r.add_argument("--latency-runs", type=int, default=300, help="timed batch-1 query calls per configuration")
    r.add_argument("--warmup", type=int, default=30, help="untimed batch-1 query calls first")
    r.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default="16,64,256",
                   help="comma-separated product batch sizes to time")
    r.add_argument("--min-seconds", type=float, default=3.0, help="time each product batch size for at least this")
    r.add_argument("--warmup-batches", type=int, default=3, help="untimed product calls first, per batch size")
    r.add_argument("--cpu-threads", type=int, default=0,
                   help="intra-op threads of the cpu configurations (0: ONNX Runtime's default)")
    r.add_argument("--no-iobinding", action="store_true", help="time only plain run() calls on CUDA")
    r.add_argument("--commands", default=None, help="a text file of the commands that produced the run, for "
                                                    "the report")

    rep = sub.add_parser("report", help="write gpu.md again from gpu.json",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rep.add_argument("--json", default=str(RESULTS / "gpu.json"), help="the results run wrote")
    rep.add_argument("--markdown", default=str(RESULTS / "gpu.md"), help="the report to write")
    rep.add_argument("--commands", default=None,
                     help="a text file of the commands that produced the run (stored into the JSON too)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    {"prepare": prepare, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
