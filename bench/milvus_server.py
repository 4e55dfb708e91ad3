"""Milvus standalone server (HNSW) against Milvus Lite, in one run: top-10 latency and recall (vs exact
brute force), throughput and p99 under concurrency, insert and build time, at the catalog's size and at
1M vectors; and, on the server, which HNSW `ef` keeps top-100 as good as exact search.

    HF_HUB_OFFLINE=1 python bench/milvus_server.py --sizes 44072,1000000

Vectors and queries are those of bench/milvus_search.py: the indexed catalog's product embeddings
(read from a copy of the Lite file, never the file itself), grown to the larger sizes by perturbed
copies, and the evaluation set's text queries embedded by the served model through a real Triton.
The server is client/milvus_server.py's Milvus 2.3.5 standalone (temporary data directory, free
port, started afresh for each size and always stopped); Lite is milvus-lite in a temporary file.
Each backend runs alone: the other is stopped while it is measured. Concurrency is N threads, each
with its own MilvusClient, sharing a fixed number of queries per level. Writes
bench/results/milvus_server.{md,json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.milvus_search import exact_top, grow  # noqa: E402
from client import store  # noqa: E402
from client.encoder import TritonEncoder  # noqa: E402
from client.milvus_server import MilvusServer  # noqa: E402
from core.metrics import percentiles, rank, retrieval_metrics  # noqa: E402
from core.queries import DEFAULT_EVAL_SET, QuerySet  # noqa: E402
from export.serve import TritonServer, free_port  # noqa: E402

logger = logging.getLogger("bench.milvus_server")
RESULTS = ROOT / "bench" / "results"
BACKENDS = ("lite", "server")
NAME = "bench"  # the benchmark's collection, in its own Lite file / server data directory
WAIT_S = 3600.0  # the longest an index build or a load may take


def read_catalog(uri: str, collection: str, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(product ids, vectors) of the indexed catalog, read from a copy of the Lite file: Milvus Lite
    is one process per file, and someone else may have the original open."""
    copy = work / "catalog_copy.db"
    shutil.copy2(uri, copy)
    client = store.connect(str(copy), timeout_s=60)
    ids, vectors = [], []
    iterator = client.query_iterator(collection, batch_size=5000, filter="", output_fields=[store.ID, store.VECTOR])
    with tqdm(desc="reading the catalog's vectors", unit="vec") as bar:
        while rows := iterator.next():
            ids += [str(r[store.ID]) for r in rows]
            vectors += [r[store.VECTOR] for r in rows]
            bar.update(len(rows))
    iterator.close()
    client.close()
    release_lite(copy)
    return np.asarray(ids), np.asarray(vectors, dtype=np.float32)


def release_lite(path: Path) -> None:
    """Stop the milvus-lite process pymilvus started for `path` (it otherwise lives as long as we do)."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(path))


def embed_texts(model_repository: Path, texts: list[str], batch: int = 32) -> np.ndarray:
    server = TritonServer(model_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_file=Path(tempfile.gettempdir()) / "bench_milvus_server_triton.log")
    server.start()
    try:
        encoder = TritonEncoder(server.grpc_url, "grpc")
        out = np.concatenate([encoder.embed_queries(texts[i:i + batch]) for i in range(0, len(texts), batch)])
        encoder.close()
    finally:
        server.stop()
    return out.astype(np.float32)


def build(client, vectors: np.ndarray, index_type: str, build_params: dict, batch: int) -> dict:
    """Create the collection, insert, flush, index (waiting until every row is indexed) and load it."""
    from pymilvus import DataType

    if client.has_collection(NAME):
        client.drop_collection(NAME)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
    client.create_collection(NAME, schema=schema)
    started = time.perf_counter()
    for start in tqdm(range(0, len(vectors), batch), desc=f"insert {len(vectors):,}", unit="batch"):
        chunk = vectors[start:start + batch]
        client.insert(NAME, [{"id": start + i, "vector": v} for i, v in enumerate(chunk.tolist())])
    insert_s = time.perf_counter() - started
    started = time.perf_counter()
    client.flush(NAME)
    flush_s = time.perf_counter() - started
    index = client.prepare_index_params()
    index.add_index("vector", index_type=index_type, metric_type=store.METRIC, params=build_params)
    started = time.perf_counter()
    client.create_index(NAME, index, timeout=WAIT_S)
    create_index_s = time.perf_counter() - started
    info, wait = wait_indexed(client, started + WAIT_S)
    index_s = time.perf_counter() - started
    started = time.perf_counter()
    client.load_collection(NAME, timeout=WAIT_S)
    load_s = time.perf_counter() - started
    rows = store.count(client, NAME)
    if rows != len(vectors):
        raise RuntimeError(f"the collection holds {rows} rows, {len(vectors)} were inserted")
    return {"insert_s": insert_s, "insert_per_s": len(vectors) / insert_s, "flush_s": flush_s, "index_s": index_s,
            "load_s": load_s, "build_load_s": flush_s + index_s + load_s, "create_index_s": create_index_s, **wait,
            "indexed_rows": int(info.get("indexed_rows", rows)), "segments": loaded_segments(client)}


def wait_indexed(client, deadline: float) -> tuple[dict, dict]:
    """Wait until no row waits for the index: the server's create_index returns on state Finished, which
    it reports while compaction's merged segments still wait for theirs. Returns the index's description
    and what the wait saw: rows pending when create_index returned, and how often the count went up again."""
    first, last, rises = None, None, 0
    while True:
        info = client.describe_index(NAME, "vector") or {}
        pending = int(info.get("pending_index_rows", 0))
        first = pending if first is None else first
        rises += last is not None and pending > last
        last = pending
        if pending == 0 and info.get("state", "Finished") == "Finished":
            return info, {"pending_after_create_index": first, "pending_rises": rises}
        if time.perf_counter() > deadline:
            raise TimeoutError(f"index still building: {info}")
        time.sleep(1.0)


def loaded_segments(client) -> int | None:
    """Sealed segments the query node holds: HNSW searches each, then merges."""
    from pymilvus import utility

    try:
        with quiet_pymilvus():
            return len(utility.get_query_segment_info(NAME, using=client._using))
    except Exception:  # noqa: BLE001 - Milvus Lite has no query segment info; the count is informative only
        return None


def search_all(client, queries: list[list[float]], k: int, params: dict) -> tuple[list[float], list[list[int]]]:
    """One query at a time: (latency ms, ids best first) per query, after five warm-up queries."""
    search = {"metric_type": store.METRIC, "params": params}
    for q in queries[:5]:
        client.search(NAME, data=[q], limit=k, search_params=search)
    latencies, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = client.search(NAME, data=[q], limit=k, search_params=search)[0]
        latencies.append((time.perf_counter() - t0) * 1e3)
        found.append([int(h["id"]) for h in hits])
    return latencies, found


def overlap(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    """Mean share of exact search's top k that the index's top k holds (recall@k vs exact)."""
    return float(np.mean([len(set(f) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def concurrency(uri: str, queries: list[list[float]], params: dict, level: int, total: int, k: int = 10) -> dict:
    """`total` top-k queries shared by `level` threads, each with its own client: queries/s and latency."""
    clients = [store.connect(uri, timeout_s=60) for _ in range(level)]
    search = {"metric_type": store.METRIC, "params": params}
    latencies: list[list[float]] = [[] for _ in range(level)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(level + 1)

    def worker(t: int) -> None:
        client = clients[t]
        try:
            for q in queries[t:t + 3]:
                client.search(NAME, data=[q], limit=k, search_params=search)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            errors.append(exc)
        barrier.wait()
        if errors:
            return
        try:
            for i in range(t, total, level):
                t0 = time.perf_counter()
                client.search(NAME, data=[queries[i % len(queries)]], limit=k, search_params=search)
                latencies[t].append((time.perf_counter() - t0) * 1e3)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(level)]
    try:
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()
    if errors:
        raise errors[0]
    flat = [x for part in latencies for x in part]
    return {"concurrency": level, "queries": len(flat), "qps": len(flat) / wall, **percentiles(flat)}


@contextlib.contextmanager
def quiet_pymilvus():
    """A refused search is a result reported in the table, not pymilvus's error lines (its loggers set
    their own levels, so each is quietened)."""
    names = ("pymilvus", "pymilvus.decorators", "pymilvus.milvus_client.milvus_client", "pymilvus.orm.utility")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def ef_sweep(client, queries: list[list[float]], efs: list[int], k: int, truth: np.ndarray,
             ids: np.ndarray | None, relevant: list[list[str]] | None, exact_recall: float | None) -> list[dict]:
    """HNSW top-k at each `ef`: p50/p99, overlap with exact top-k, and (catalog size) the eval set's Recall@k.

    The values take turns query by query (each query at every ef, in a rotating order), so that the
    other work on the machine weighs on every ef alike."""
    rows = {ef: {"ef": ef, "k": k} for ef in efs}
    usable = []
    for ef in efs:  # five warm-up queries each; a refused ef is a result (Milvus 2.3 wants ef >= k)
        try:
            with quiet_pymilvus():
                search_all(client, queries[:5], k, {"ef": ef})
            usable.append(ef)
        except Exception as exc:  # noqa: BLE001
            message = str(getattr(exc, "message", exc))
            said = re.search(r"ef\(\d+\) should be larger than k\(\d+\)", message)
            rows[ef]["error"] = said.group(0) if said else message[-160:]
            logger.info("ef %d refused: %s", ef, rows[ef]["error"])
    latencies: dict[int, list[float]] = {ef: [] for ef in usable}
    found: dict[int, list[list[int]]] = {ef: [None] * len(queries) for ef in usable}
    for i, q in enumerate(queries):
        for j in range(len(usable)):
            ef = usable[(i + j) % len(usable)]
            t0 = time.perf_counter()
            hits = client.search(NAME, data=[q], limit=k, search_params={"metric_type": store.METRIC,
                                                                         "params": {"ef": ef}})[0]
            latencies[ef].append((time.perf_counter() - t0) * 1e3)
            found[ef][i] = [int(h["id"]) for h in hits]
    for ef in usable:
        row = rows[ef]
        row.update(percentiles(latencies[ef]))
        row[f"overlap@{k}"] = overlap(found[ef], truth, k)
        if ids is not None and relevant is not None:
            recall = eval_recall([ids[f].tolist() for f in found[ef]], relevant, k)
            row[f"eval_recall@{k}"] = recall
            row["of_exact"] = recall / exact_recall
        logger.info("ef %s", row)
    return [rows[ef] for ef in efs]


def eval_recall(ranked: list[list[str]], relevant: list[list[str]], k: int) -> float:
    """The eval set's Recall@k (capped, core.metrics) over the queries with a relevant product in the catalog."""
    keep = [i for i, rel in enumerate(relevant) if rel]
    return retrieval_metrics([ranked[i] for i in keep], [relevant[i] for i in keep], ks=(k,))[f"recall@{k}"]


def bench_one(backend: str, size: int, vectors: np.ndarray, args: argparse.Namespace, work: Path, sweep: dict) -> dict:
    """Build, then measure, one (backend, size); the backend's process lives only inside this call."""
    server = None
    if backend == "server":
        server = MilvusServer(data_dir=work / f"server_{size}", port=free_port())
        server.start()
        uri = server.uri
        index_type = "HNSW"
        efc = args.ef_construction_large if size >= args.large_from else args.ef_construction
        build_params = {"M": args.hnsw_m, "efConstruction": efc}
    else:
        uri = str(work / f"lite_{size}.db")
        index_type, build_params = args.lite_index, store.INDEX_PARAMS.get(args.lite_index, {})
    search_params = store.search_params(index_type, 10)
    row = {"backend": backend, "vectors": size, "index": index_type, "build_params": build_params,
           "search_params": search_params}
    try:
        client = store.connect(uri, timeout_s=60)
        logger.info("%s %s: building %s %s", backend, f"{size:,}", index_type, build_params)
        row.update(build(client, vectors, index_type, build_params, args.insert_batch))
        logger.info("%s %s: insert %.0f/s, build+load %.1f s (index %.1f s, %s segments)", backend, f"{size:,}",
                    row["insert_per_s"], row["build_load_s"], row["index_s"], row["segments"])
        latencies, found = search_all(client, sweep["queries"], 10, search_params)
        row.update({f"top10_{key}": value for key, value in percentiles(latencies).items()})
        row["recall@10"] = overlap(found, sweep["truth10"], 10)
        row["concurrency"] = []
        for level in args.concurrency:
            measured = concurrency(uri, sweep["queries"], search_params, level, args.per_level)
            logger.info("%s %s: c=%d %.1f q/s p99 %.2f ms", backend, f"{size:,}", level, measured["qps"],
                        measured["p99_ms"])
            row["concurrency"].append(measured)
        k = args.top_k
        ids, relevant, exact = sweep["ids"], sweep["relevant"], sweep["exact_eval_recall"]
        if backend == "server":
            row["ef_sweep"] = ef_sweep(client, sweep["eval_queries"], args.efs, k, sweep["truth_k"], ids, relevant,
                                       exact)
        else:  # Lite's own index with its default search parameters, for comparison
            row["top_k"] = ef_sweep_lite(client, sweep, k, ids, relevant, exact)
        row["segments_after"] = loaded_segments(client)  # a compaction during the run would change it
        client.drop_collection(NAME)
        client.close()
    finally:
        if server is not None:
            server.stop()
        else:
            release_lite(Path(uri))
    return row


def ef_sweep_lite(client, sweep: dict, k: int, ids, relevant, exact) -> dict:
    latencies, found = search_all(client, sweep["eval_queries"], k, {})
    row = {"k": k, **percentiles(latencies), f"overlap@{k}": overlap(found, sweep["truth_k"], k)}
    if ids is not None:
        row[f"eval_recall@{k}"] = eval_recall([ids[f].tolist() for f in found], relevant, k)
        row["of_exact"] = row[f"eval_recall@{k}"] / exact
    return row


def recommended_ef(result: dict, target: float, key: str) -> int | None:
    """The smallest ef whose ANN top-k reaches `target` in `key` (of_exact: share of exact search's eval
    Recall@k; overlap@k: share of exact search's top k), at the catalog's size."""
    for row in result["runs"]:
        if row["backend"] == "server" and row["vectors"] == result["catalog_products"]:
            ok = [r["ef"] for r in row["ef_sweep"] if r.get(key, 0.0) >= target]
            return min(ok) if ok else None
    return None


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _segments(row: dict) -> str:
    if row["segments"] is None:
        return "-"
    after = row.get("segments_after")
    return str(row["segments"]) if after in (None, row["segments"]) else f"{row['segments']} (then {after})"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def summarize(result: dict, argv: str) -> str:
    k = result["top_k"]
    runs = result["runs"]
    exact_text = ", ".join(f"R@{k} {v:.4f} over {int(s):,} vectors" for s, v in result["exact_eval_recall"].items())
    lines = ["# Milvus standalone server (HNSW) vs Milvus Lite: latency, recall, throughput; HNSW ef for top-100",
             "", f"`HF_HUB_OFFLINE=1 python bench/milvus_server.py {argv}`".replace("  ", " "), "",
             f"Machine: {result['machine']['cpus']} CPU cores, no GPU, shared with other work while this ran "
             f"(load average {result['machine']['load_before']} before, {result['machine']['load_after']} after): "
             "absolute numbers are this small, busy machine's; the ratios, measured in the same run one backend "
             "at a time, are what carries over. Client, Milvus and the benchmark share the same 2 cores, so "
             "above 2 threads the client's own CPU competes with the server's.", "",
             f"Milvus server {result['versions']['milvus_server']} standalone (client/milvus_server.py, local "
             f"storage, default segment settings) and milvus-lite {result['versions']['milvus_lite']}, through "
             f"pymilvus {result['versions']['pymilvus']}. Vectors: {result['dim']}-d, the indexed catalog's "
             f"{result['catalog_products']:,} product embeddings, grown by perturbed copies (sigma {result['sigma']}, "
             f"renormalized) to the larger sizes. Queries: the evaluation set's text queries embedded by Triton; "
             f"{result['queries']} for top-10 latency and recall@10 (vs exact numpy brute force), "
             f"{result['eval_queries']} for the top-{k} sweep. Concurrency: N threads, each with its own "
             f"MilvusClient, sharing {result['per_level']} top-10 queries per level.", "",
             "## Top-10 at concurrency 1, insert and build", "",
             "| vectors | backend | index | build params | search params | insert/s | build+load s "
             "(flush / index / load) | segments | top-10 p50 ms | top-10 p99 ms | recall@10 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['vectors']:,} | {r['backend']} | {r['index']} | {json.dumps(r['build_params'])} | "
                     f"{json.dumps(r['search_params'])} | {r['insert_per_s']:.0f} | {r['build_load_s']:.1f} "
                     f"({r['flush_s']:.1f} / {r['index_s']:.1f} / {r['load_s']:.1f}) | {_segments(r)} | "
                     f"{r['top10_p50_ms']:.2f} | {r['top10_p99_ms']:.2f} | {r['recall@10']:.4f} |")
    levels = [c["concurrency"] for c in runs[0]["concurrency"]] if runs else []
    lines += ["", "## Throughput under concurrency (top-10): queries/s, p99 ms", "",
              "| vectors | backend | " + " | ".join(f"c={c}" for c in levels) + " |",
              "|---|---|" + "---|" * len(levels)]
    for r in runs:
        cells = [f"{c['qps']:.0f} q/s, p99 {c['p99_ms']:.1f}" for c in r["concurrency"]]
        lines.append(f"| {r['vectors']:,} | {r['backend']} | " + " | ".join(cells) + " |")
    lines += ["", "## Side by side: server / Lite at each size (same run)", "",
              "| vectors | p50 c=1 | p99 c=1 | best q/s | q/s at c=" + str(levels[-1] if levels else "") +
              " | recall@10 (server, Lite) | insert/s | build+load s |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["backend"], r["vectors"]): r for r in runs}
    for size in result["sizes"]:
        s, lt = by.get(("server", size)), by.get(("lite", size))
        if not s or not lt:
            continue
        best = (max(c["qps"] for c in s["concurrency"]), max(c["qps"] for c in lt["concurrency"]))
        lines.append(f"| {size:,} | {_ratio(s['top10_p50_ms'], lt['top10_p50_ms'])} | "
                     f"{_ratio(s['top10_p99_ms'], lt['top10_p99_ms'])} | {_ratio(*best)} "
                     f"({best[0]:.0f} vs {best[1]:.0f}) | "
                     f"{_ratio(s['concurrency'][-1]['qps'], lt['concurrency'][-1]['qps'])} | "
                     f"{s['recall@10']:.4f}, {lt['recall@10']:.4f} | {_ratio(s['insert_per_s'], lt['insert_per_s'])} | "
                     f"{_ratio(s['build_load_s'], lt['build_load_s'])} |")
    lines += ["", "Latency ratios below 1 mean the server is faster; throughput and insert ratios above 1 mean "
              "it is faster.", "",
              f"## HNSW ef for top-{k} (server)", "",
              f"The client asks for ef = max(64, k) (client/store.search_params): ef {max(64, k)} at k = {k}. "
              f"'overlap' is the mean share of exact search's top {k} that HNSW's top {k} holds; 'eval R@{k}' is the "
              f"evaluation set's Recall@{k} (capped, core.metrics, relevance judgements of the catalog's products; "
              f"catalog size only) from HNSW's ranking, and 'of exact' divides it by exact search's "
              f"({exact_text}, {result['eval_queries']} queries).", "",
              f"| vectors | ef | top-{k} p50 ms | top-{k} p99 ms | overlap with exact top-{k} | eval R@{k} "
              "| of exact |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        if r["backend"] != "server":
            continue
        for e in r["ef_sweep"]:
            if "error" in e:
                lines.append(f"| {r['vectors']:,} | {e['ef']} | refused: {e['error']} | | | | |")
                continue
            ev = (f"{e[f'eval_recall@{k}']:.4f} | {e['of_exact']:.4f}" if f"eval_recall@{k}" in e else "- | -")
            lines.append(f"| {r['vectors']:,} | {e['ef']} | {e['p50_ms']:.2f} | {e['p99_ms']:.2f} | "
                         f"{e[f'overlap@{k}']:.4f} | {ev} |")
    for r in runs:
        if r["backend"] == "lite":
            t = r["top_k"]
            ev = (f"{t[f'eval_recall@{k}']:.4f} | {t['of_exact']:.4f}" if f"eval_recall@{k}" in t else "- | -")
            lines.append(f"| {r['vectors']:,} | Lite {r['index']} (no ef) | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | "
                         f"{t[f'overlap@{k}']:.4f} | {ev} |")
    ef, ef_overlap = (result["recommended_ef"] if result["recommended_ef"] is not None else "none of those tried",
                      result["recommended_ef_overlap"] if result["recommended_ef_overlap"] is not None
                      else "none of those tried")
    lines += ["", f"At the catalog's size, the smallest ef whose top-{k} keeps >= {result['target']} of exact search's "
              f"eval Recall@{k}: **{ef}**; the smallest whose top-{k} holds >= {result['target']} of exact search's "
              f"top {k} (a stricter test: it also counts swaps between products the eval set does not judge): "
              f"**{ef_overlap}**.", ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_qps, ax_p99, ax_ef) = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = {"server": ("-", "o"), "lite": ("--", "s")}
    colours = {size: f"C{i}" for i, size in enumerate(result["sizes"])}
    levels = []
    for r in result["runs"]:
        label = f"{r['backend']} {r['index']} {r['vectors']:,}"
        levels = [c["concurrency"] for c in r["concurrency"]]
        line, marker = styles[r["backend"]]
        for ax, key in ((ax_qps, "qps"), (ax_p99, "p99_ms")):
            ax.plot(levels, [c[key] for c in r["concurrency"]], line, marker=marker, color=colours[r["vectors"]],
                    label=label)
    for ax, title, unit in ((ax_qps, "throughput, top-10", "queries/s"), (ax_p99, "latency p99, top-10", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients (threads)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_p99.set_yscale("log")
    ax_p99.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_p99.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_p99.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    k = result["top_k"]
    latency = ax_ef.twinx()
    for r in result["runs"]:
        if r["backend"] != "server":
            continue
        ok = [e for e in r["ef_sweep"] if "error" not in e]
        efs = [e["ef"] for e in ok]
        colour = colours[r["vectors"]]
        ax_ef.plot(efs, [e[f"overlap@{k}"] for e in ok], "-", marker="o", color=colour,
                   label=f"overlap with exact, {r['vectors']:,}")
        if ok and "of_exact" in ok[0]:
            ax_ef.plot(efs, [e["of_exact"] for e in ok], "-.", marker="s", color=colour,
                       label=f"eval R@{k} / exact's, {r['vectors']:,}")
        latency.plot(efs, [e["p50_ms"] for e in ok], ":", marker="x", color=colour, alpha=0.6)
    ax_ef.axhline(result["target"], color="red", lw=0.8)
    ax_ef.set_xlabel("HNSW ef")
    ax_ef.set_ylabel(f"top-{k} vs exact")
    latency.set_ylabel(f"top-{k} p50 ms (dotted, x)")
    ax_ef.set_title(f"server HNSW: top-{k} quality and p50 vs ef")
    ax_ef.grid(alpha=0.3)
    ax_ef.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Milvus {result['versions']['milvus_server']} standalone (HNSW) vs Milvus Lite "
                 f"{result['versions']['milvus_lite']}; {result['machine']['cpus']} shared CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--milvus-uri", default=store.DEFAULT_URI,
                   help="the Lite file client/index.py filled (only a copy of it is opened)")
    p.add_argument("--collection", default=store.COLLECTION, help="collection holding the catalog's vectors")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"), help="repository Triton serves")
    p.add_argument("--eval-set", type=Path, default=DEFAULT_EVAL_SET, help="evaluation set (its text queries)")
    p.add_argument("--sizes", default="44072,1000000", help="comma-separated collection sizes to test")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: lite, server")
    p.add_argument("--lite-index", default="AUTOINDEX", help="Lite's index type (what client/index.py builds)")
    p.add_argument("--hnsw-m", type=int, default=store.INDEX_PARAMS["HNSW"]["M"], help="server HNSW M")
    p.add_argument("--ef-construction", type=int, default=store.INDEX_PARAMS["HNSW"]["efConstruction"],
                   help="server HNSW efConstruction")
    p.add_argument("--ef-construction-large", type=int, default=store.INDEX_PARAMS["HNSW"]["efConstruction"],
                   help="server HNSW efConstruction from --large-from vectors on (a faster build)")
    p.add_argument("--large-from", type=int, default=500_000, help="size from which --ef-construction-large applies")
    p.add_argument("--queries", type=int, default=200, help="queries for top-10 latency and recall@10")
    p.add_argument("--eval-queries", type=int, default=0, help="queries for the top-k sweep (0: every text query)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated thread counts")
    p.add_argument("--per-level", type=int, default=400, help="queries per concurrency level, all threads together")
    p.add_argument("--top-k", type=int, default=100, help="k of the ef sweep")
    p.add_argument("--efs", default="64,100,128,200,400", help="comma-separated HNSW ef values for top-k")
    p.add_argument("--target", type=float, default=0.99, help="share of exact search's eval recall@k to keep")
    p.add_argument("--insert-batch", type=int, default=2000, help="rows per insert call (both backends)")
    p.add_argument("--sigma", type=float, default=0.02, help="per-dimension noise of the replicated vectors")
    p.add_argument("--work-dir", type=Path, default=None, help="where Lite files and server data go (default: temp)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where milvus_server.{md,json,png} go")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: rewrite the md and png (and notes) from --out's milvus_server.json")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.backends = [b for b in args.backends.split(",") if b]
    if unknown := set(args.backends) - set(BACKENDS):
        p.error(f"unknown backends {sorted(unknown)}: expected {BACKENDS}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.efs = [int(e) for e in args.efs.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.render:
        write(json.loads((args.out / "milvus_server.json").read_text()), args.out)
        return
    from importlib.metadata import version

    load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    qs = QuerySet.load(args.eval_set)
    texts = qs.texts[: args.eval_queries or None]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="milvus_server_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        ids, base = read_catalog(args.milvus_uri, args.collection, work)
        eval_queries = embed_texts(args.model_repository, texts)
        corpus = set(ids.tolist())
        relevant = [[r for r in rel if r in corpus] for rel in qs.text_relevant[: len(texts)]]
        k = args.top_k
        result = {"sizes": args.sizes, "queries": min(args.queries, len(texts)), "eval_queries": len(texts),
                  "dim": int(base.shape[1]), "catalog_products": len(base), "sigma": args.sigma, "top_k": k,
                  "per_level": args.per_level, "target": args.target, "exact_eval_recall": {},
                  "machine": {"cpus": os.cpu_count(), "load_before": load_before},
                  "versions": {"milvus_server": version("milvus"), "milvus_lite": version("milvus-lite"),
                               "pymilvus": version("pymilvus")},
                  "argv": " ".join(argv if argv is not None else sys.argv[1:]),
                  "hnsw": {"M": args.hnsw_m, "efConstruction": args.ef_construction,
                           "efConstruction_large": args.ef_construction_large, "large_from": args.large_from},
                  "runs": [], "notes": []}
        queries = eval_queries[: args.queries]
        for size in args.sizes:
            vectors = grow(base, size, args.sigma)
            sweep = {"queries": queries.tolist(), "truth10": exact_top(queries, vectors, 10),
                     "eval_queries": eval_queries.tolist(), "truth_k": exact_top(eval_queries, vectors, k),
                     "ids": None, "relevant": None, "exact_eval_recall": None}
            if size <= len(ids):  # relevance judgements name catalog products: only the real vectors have them
                exact_eval = eval_recall(rank(eval_queries, vectors, ids[:size], k=k), relevant, k)
                logger.info("exact search over %s: eval Recall@%d %.4f (%d queries)", f"{size:,}", k, exact_eval,
                            len(texts))
                result["exact_eval_recall"][str(size)] = exact_eval
                sweep.update(ids=ids, relevant=relevant, exact_eval_recall=exact_eval)
            for backend in args.backends:
                row = bench_one(backend, size, vectors, args, work, sweep)
                result["runs"].append(row)
                (args.out / "milvus_server.json").write_text(json.dumps(result, indent=2) + "\n")  # partial results
            del vectors, sweep
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_after"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    write(result, args.out)


def write(result: dict, out: Path) -> None:
    """milvus_server.{json,md,png} from the measurements (also what --render redoes from the JSON)."""
    k, target = result["top_k"], result["target"]
    result["recommended_ef"] = recommended_ef(result, target, "of_exact")
    result["recommended_ef_overlap"] = recommended_ef(result, target, f"overlap@{k}")
    result["notes"] = notes(result)
    (out / "milvus_server.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "milvus_server.png")
    text = summarize(result, result["argv"])
    (out / "milvus_server.md").write_text(text)
    logger.info("wrote %s\n%s", out / "milvus_server.md", text)


def notes(result: dict) -> list[str]:
    """What the numbers say, computed from them, and how far to trust them."""
    out, k, target, hnsw = [], result["top_k"], result["target"], result["hnsw"]
    by = {(r["backend"], r["vectors"]): r for r in result["runs"]}
    for size in result["sizes"]:
        server, lite = by.get(("server", size)), by.get(("lite", size))
        if not server or not lite:
            continue
        scale = {name: (max(c["qps"] for c in r["concurrency"]) / r["concurrency"][0]["qps"],
                        r["concurrency"][-1]["p99_ms"] / r["concurrency"][0]["p99_ms"])
                 for name, r in (("server", server), ("Lite", lite))}
        out.append(f"{size:,} vectors: the server answers a top-10 in {server['top10_p50_ms']:.1f} ms (p50) against "
                   f"Lite's {lite['top10_p50_ms']:.1f} ms, with recall@10 {server['recall@10']:.3f} against "
                   f"{lite['recall@10']:.3f}. More threads raise the server's throughput "
                   f"{scale['server'][0]:.1f}x over one thread; Lite's {scale['Lite'][0]:.1f}x, while its p99 grows "
                   f"{scale['Lite'][1]:.0f}x from 1 to {lite['concurrency'][-1]['concurrency']} threads (the server's "
                   f"{scale['server'][1]:.1f}x): Lite's one process answers about one query at a time.")
        if server.get("pending_after_create_index"):
            out.append(f"{size:,} vectors, server build: create_index returned after {server['create_index_s']:.0f} s "
                       f"with {server['pending_after_create_index']:,} rows still waiting for their index, and the "
                       f"waiting count rose {_times(server['pending_rises'])} while the benchmark waited: compaction "
                       f"merged the small sealed segments and the merged ones were indexed again. Every row was "
                       f"indexed after {server['index_s']:.0f} s, ending in {server['segments']} segments.")
    large = [s for s in result["sizes"] if s >= hnsw["large_from"]]
    efc = hnsw["efConstruction_large"] if large else hnsw["efConstruction"]
    builds = [r["build_load_s"] for r in result["runs"] if r["backend"] == "server" and r["vectors"] in large]
    if large and builds:
        out.append(f"HNSW at {', '.join(f'{s:,}' for s in large)} vectors: M {hnsw['M']}, efConstruction {efc}"
                   + (f" (lowered from {hnsw['efConstruction']} to keep the build short on 2 cores)"
                      if efc != hnsw["efConstruction"] else "")
                   + f"; build+load took {max(builds) / 60:.1f} min.")
    biggest = max((r for r in result["runs"] if r["backend"] == "server"), key=lambda r: r["vectors"], default=None)
    if biggest is not None and biggest["vectors"] > result["catalog_products"]:
        ok = [e for e in biggest["ef_sweep"] if "error" not in e]
        best = [e["ef"] for e in ok if e[f"overlap@{k}"] >= target]
        reach = f"ef {min(best)} is the first to reach {target}" if best else f"no ef tried reaches {target}"
        out.append(f"At {biggest['vectors']:,} vectors HNSW's top {k} holds "
                   + ", ".join(f"{e[f'overlap@{k}']:.3f} (ef {e['ef']})" for e in ok)
                   + f" of exact search's; {reach}. "
                   "The grown vectors are a hard case for any ANN index: each real product has about "
                   f"{biggest['vectors'] // result['catalog_products']} perturbed copies close around it, so exact "
                   "top lists are dense clusters of near-ties. The eval set judges only real products, so there is "
                   "no eval recall at this size.")
    out.append("Milvus 2.3.5 refuses ef < k (for top-100, ef 64 fails with 'ef(64) should be larger than k(100)'); "
               "client/store.search_params's max(64, k) already sends ef = k.")
    out.append("recall@10 below 1 for an exact-quality index comes from ties: the catalog holds products with "
               "identical vectors, and exact search keeps an arbitrary one of them.")
    out.append("build+load is flush (sealing what was inserted), the index build until no row waits for it, and the "
               "load. The server searches each loaded segment and merges the results. Lite (AUTOINDEX) and the "
               "server are one process each here (no cluster); all of Lite's clients share its one process.")
    out.append("Every number is one measurement, not a mean of repeats, and the other work on this 2-core machine "
               "came and went (see the load averages above). When this benchmark was written, two full runs on this "
               "machine differed by up to 2x in single throughput, p99 and build-time numbers (the server's 1M "
               "build took 7.4 min in one and 10.9 min in the other; its 1M throughput at 16 threads, 977 and 495 "
               "queries/s), and c=1 against c=2 of one backend can swap order: read "
               "the server/Lite ratios, several-fold in throughput, as the result, and smaller differences as noise. "
               "The top-k sweep interleaves its ef values query by query, so load drift weighs on each alike.")
    return out


if __name__ == "__main__":
    main()
