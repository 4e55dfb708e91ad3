"""The whole search service under load: the page's JSON API over HTTP, then each stage alone, with CPU accounting.

    .venv/bin/python bench/service.py             # both backends, ~17 minutes here; bench/results/service.*
    .venv/bin/python bench/service.py --quick     # seconds per point: a smoke run, results in the work dir
    .venv/bin/python bench/service.py --report bench/results/service.json   # tables and plot again, no run

Needs what `make demo` built (model_repository, runs/milvus.db) and the index `make serve` made once in
runs/milvus-server; it starts its own Triton, Milvus server and pages on free ports (`make stop` a served
one first: one process per Lite file).

What it runs. Triton on the model repository (free ports), then per backend: the Milvus side (the Lite file
`runs/milvus.db` that `make demo` indexed, opened by the page itself; or the shared server path, Lite 2.5.1
served over TCP by `python -m client.milvus_server` on `runs/milvus-server`, the 44k catalog behind the
serving name "products"), the page (`client/app.py`, a subprocess) and a load generator against its API:
- text queries from the evaluation sets (training/eval_sets: attribute phrases, model codes, rare names) as
  GET /api/search?q=...&mode=hybrid (or dense), and 20% photo queries (POST /api/search/image, multipart
  `file`): the catalog photos of the evaluation set's image queries;
- closed loop at concurrency 1, 4, 16, 64 (users with no wait); open loop at fixed arrival rates, fractions of
  the closed-loop throughput at c=16, past saturation (1.25x); throughput, p50 / p99 (p99.9 where a point has
  >= 10,000 requests), errors, late arrivals of the open loop's schedule;
- the page's per-stage times from its /metrics histograms (embed, search, total by kind), scraped around each
  point, and the CPU-seconds per query of every server process (/proc/<pid>/stat utime + stime, children
  included): the page, Triton's process group (with its Python-backend stubs), Milvus (the Lite engine the
  page runs as its child, or the server's process group); the load generator's own CPU apart;
- each stage alone with the same queries at the same concurrency: Triton (client.encoder.TritonEncoder,
  embed_queries / embed_images) and Milvus (client.store.search and lexical_search with the vectors embedded
  beforehand; hybrid = both), with their CPU-seconds per query; the page's overhead is the service's CPU per
  query minus the sum of those parts.
Writes OUT.json (every point), OUT.md (tables and what bounds the service) and OUT.png.

Why locust (bench/locustfile.py). The mix needs text GETs and multipart photo POSTs in one stream, and the
open loop needs arrivals that do not wait for answers. wrk and hey are closed-loop only (a fixed number of
connections, each sending when the last answer came back) and cannot mix a multipart photo into a stream of
GETs (wrk only through a Lua script that builds the body); wrk2 and vegeta, the open-loop ones, do not install
here. locust (PyPI, maintained) scripts both request kinds in Python, keeps its CPU low with FastHttpUser
(geventhttpclient), runs headless and writes CSV stats (percentiles per request name, a per-second history).
Its users are closed loops; an open loop is approximated by many users on Poisson schedules (the
locustfile's docstring), and each point reports how many arrivals came late. Its percentiles are rounded
(whole ms under 100 ms, 10 ms up to 1 s). It runs on the same 2 cores as the servers: its CPU is reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from client import serving, store  # noqa: E402
from client.encoder import TritonEncoder  # noqa: E402
from client.milvus_server import MilvusServer, MilvusServerError  # noqa: E402
from client.page_process import PageServer  # noqa: E402
from client.search import FACET_DEPTH  # noqa: E402
from core.catalog import DEFAULT_CATALOG, ImageFetcher, read_catalog  # noqa: E402
from core.metrics import percentiles  # noqa: E402
from core.queries import CODES_EVAL_SET, DEFAULT_EVAL_SET, NAMES_EVAL_SET, QuerySet  # noqa: E402
from core.server_process import free_port  # noqa: E402
from export.serve import TritonServer  # noqa: E402

logger = logging.getLogger("bench.service")
LOCUSTFILE = ROOT / "bench" / "locustfile.py"
RESULTS = ROOT / "bench" / "results"
DEPTH = FACET_DEPTH  # the page searches this deep (facets over the top 100) whatever k it shows
KINDS = {"text": "text", "photo": "image"}  # locust request name -> the page's metrics label
STAGES = ("queue", "embed", "search", "total")
CLK_TCK = os.sysconf("SC_CLK_TCK")
P999_MIN_REQUESTS = 10_000
QUICK = {"seconds": 4.0, "stage_seconds": 2.0, "warmup_seconds": 3.0, "concurrency": "1,16",
         "open_fractions": "0.5,1.25", "stage_concurrency": "1,4", "long_requests": 0}


# -- the queries ---------------------------------------------------------------------------------------------------

@dataclass
class Workload:
    texts: list[str]
    photo_ids: list[str]
    photos: list[bytes]
    file: Path  # what the locustfile reads: {"texts": [...], "photos": [paths]}
    sets: dict[str, int] = field(default_factory=dict)

    def sequence(self, n: int, photo_share: float, seed: int) -> list[tuple[str, int]]:
        """The stages-alone query stream: (kind, index) with the same photo share as the load generator's."""
        rng = random.Random(seed)
        return [("photo", rng.randrange(len(self.photos))) if self.photos and rng.random() < photo_share
                else ("text", rng.randrange(len(self.texts))) for _ in range(n)]


def load_workload(catalog: str, eval_sets: Sequence[Path], workdir: Path) -> Workload:
    texts, photo_ids, sets = [], [], {}
    for path in eval_sets:
        qs = QuerySet.load(path)
        texts += qs.texts
        photo_ids += qs.image_ids
        sets[path.name] = len(qs.texts) + len(qs.image_ids)
    texts = list(dict.fromkeys(texts))
    df, _ = read_catalog(catalog)
    refs = dict(zip(df["product_id"].astype(str), df["image"]))
    fetch = ImageFetcher(base_dir=df.attrs.get("base_dir"))
    photo_dir = workdir / "photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    photos, paths, kept = [], [], []
    for pid in dict.fromkeys(photo_ids):
        try:
            data = fetch(refs[pid])
        except (KeyError, OSError, ValueError):
            logger.warning("no photo for image query %s: left out", pid)
            continue
        path = photo_dir / f"{pid}.jpg"
        path.write_bytes(data)
        photos.append(data)
        paths.append(str(path))
        kept.append(pid)
    file = workdir / "queries.json"
    file.write_text(json.dumps({"texts": texts, "photos": paths}))
    logger.info("workload: %d text queries, %d photos (%s)", len(texts), len(photos), sets)
    return Workload(texts, kept, photos, file, sets)


# -- process accounting --------------------------------------------------------------------------------------------

Procs = dict[int, tuple[int, int, float]]  # pid -> (ppid, process group, CPU seconds incl. reaped children)
Role = Callable[[int, int, int], bool]  # (pid, ppid, pgrp) -> whether the process belongs to it


def processes() -> Procs:
    """Every process's parent, group and CPU time (utime + stime + cutime + cstime) from /proc/<pid>/stat."""
    out: Procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        out[int(entry.name)] = (int(rest[1]), int(rest[2]), sum(int(x) for x in rest[11:15]) / CLK_TCK)
    return out


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (every core; /proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def cpu_delta(before: Procs, after: Procs, roles: dict[str, Role]) -> dict[str, float]:
    """CPU seconds each role's processes spent between two snapshots (a process started meanwhile: all of it)."""
    out = dict.fromkeys(roles, 0.0)
    for pid, (ppid, pgrp, cpu) in after.items():
        for name, member in roles.items():
            if member(pid, ppid, pgrp):
                out[name] += cpu - (before[pid][2] if pid in before else 0.0)
                break
    return out


def in_group(pgid: int) -> Role:
    return lambda pid, ppid, pgrp: pgrp == pgid


def our_children() -> Role:
    """Children of this process in its own group: the Lite engine an in-process MilvusClient starts (the
    servers we start run in sessions of their own)."""
    me, group = os.getpid(), os.getpgrp()
    return lambda pid, ppid, pgrp: ppid == me and pgrp == group


# -- the page and its metrics ---------------------------------------------------------------------------------------

def scrape(url: str) -> dict[str, float]:
    """The page's counters: "sum:STAGE:KIND" and "count:STAGE:KIND" of the stage histogram, "errors:CLASS",
    "resends"."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("mmsearch_stage_seconds_sum", "mmsearch_stage_seconds_count"):
                out[f"{s.name.rsplit('_', 1)[1]}:{s.labels['stage']}:{s.labels['kind']}"] = s.value
            elif s.name == "mmsearch_errors_total":
                out[f"errors:{s.labels['error_class']}"] = s.value
            elif s.name == "mmsearch_triton_resends_total":
                out["resends"] = s.value
    return out


def served(metrics: dict[str, float]) -> float:
    """Requests the page finished: searches timed, plus failures."""
    return sum(v for k, v in metrics.items() if k.startswith("count:total:") or k.startswith("errors:"))


def drain(url: str, quiet_s: float = 0.5, max_s: float = 60.0) -> dict[str, float]:
    """The page's counters once it has finished what the load generator left in flight (or queued)."""
    last, deadline = scrape(url), time.monotonic() + max_s
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = scrape(url)
        if served(now) == served(last):
            return now
        last = now
    logger.warning("the page was still answering %.0f s after the load generator stopped", max_s)
    return last


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Mean ms per stage and query kind over the window, from the histograms' sums and counts."""
    out: dict[str, dict[str, float | None]] = {}
    for kind in KINDS.values():
        out[kind] = {}
        for stage in STAGES:
            n = after.get(f"count:{stage}:{kind}", 0) - before.get(f"count:{stage}:{kind}", 0)
            s = after.get(f"sum:{stage}:{kind}", 0) - before.get(f"sum:{stage}:{kind}", 0)
            out[kind][stage] = round(1e3 * s / n, 3) if n else None
        out[kind]["count"] = after.get(f"count:total:{kind}", 0) - before.get(f"count:total:{kind}", 0)
    return out


# -- the load generator ----------------------------------------------------------------------------------------------

def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # "N/A"
        return None


def read_locust_csv(prefix: Path) -> tuple[dict[str, dict], list[list[float]], list[dict]]:
    """(stats per request name and "all", the per-second history of the aggregate, the failures)."""
    stats = {}
    with open(f"{prefix}_stats.csv") as f:
        for row in csv.DictReader(f):
            name = "all" if row["Name"] == "Aggregated" else row["Name"]
            n = int(row["Request Count"])
            stats[name] = {"requests": n, "failures": int(row["Failure Count"]), "rps": _number(row["Requests/s"]),
                           "mean_ms": _number(row["Average Response Time"]), "p50_ms": _number(row["50%"]),
                           "p99_ms": _number(row["99%"]), "max_ms": _number(row["100%"]),
                           "p999_ms": _number(row["99.9%"]) if n >= P999_MIN_REQUESTS else None}
    history = []
    with open(f"{prefix}_stats_history.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    if rows:
        t0 = int(rows[0]["Timestamp"])
        history = [[int(r["Timestamp"]) - t0, int(r["User Count"]), _number(r["Requests/s"]) or 0.0] for r in rows]
    failures = []
    if Path(f"{prefix}_failures.csv").exists():
        with open(f"{prefix}_failures.csv") as f:
            failures = [{"name": r["Name"], "error": r["Error"][:300], "count": int(r["Occurrences"])}
                        for r in csv.DictReader(f)]
    return stats, history, failures


@dataclass
class Service:
    """What one backend's service points run against: the page and the processes to account."""

    backend: str
    page: PageServer
    roles: dict[str, Role]  # page, triton, milvus
    workload: Workload
    workdir: Path
    cores: int


def run_point(svc: Service, name: str, *, mode: str, users: int, seconds: float, rate: float = 0.0,
              photo_share: float = 0.2, seed: int = 0, extra: dict | None = None) -> dict:
    """One locust run against the page; returns its record (latency, throughput, stages, CPU per query)."""
    folder = svc.workdir / "locust"
    folder.mkdir(parents=True, exist_ok=True)
    prefix, report = folder / name, folder / f"{name}.report.json"
    started, stopped = folder / f"{name}.started", folder / f"{name}.stopped"
    for path in (report, started, stopped):
        path.unlink(missing_ok=True)
    env = dict(os.environ, SVC_QUERIES=str(svc.workload.file), SVC_MODE=mode, SVC_PHOTO_SHARE=str(photo_share),
               SVC_RATE=str(rate), SVC_USERS=str(users), SVC_REPORT=str(report), SVC_STARTED=str(started),
               SVC_STOPPED=str(stopped), SVC_SEED=str(seed))
    env.pop("MILVUS_URI", None)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{max(1, round(seconds))}s", "--csv", str(prefix), "--host", svc.page.url, "--reset-stats",
           "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    logger.info("%s %s: %s, %d users%s, %.0f s", svc.backend, name, mode, users,
                f", {rate:.1f} q/s offered" if rate else " (closed loop)", seconds)
    with open(folder / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"locust did not start (exit {proc.returncode}); see {folder / name}.log")
            time.sleep(0.02)
        m0, p0, t0, b0 = scrape(svc.page.url), processes(), time.perf_counter(), machine_cpu()
        deadline = time.monotonic() + seconds + 120
        while not stopped.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        # the load's end: what the cores did while it lasted (the CPU per query also counts the backlog after it)
        pm, tm, bm = processes(), time.perf_counter(), machine_cpu()
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    m1 = drain(svc.page.url)
    p1, t1 = processes(), time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"locust exited {proc.returncode}; see {folder / name}.log")
    stats, history, failures = read_locust_csv(prefix)
    gen = json.loads(report.read_text()) if report.exists() else {}
    cpu = cpu_delta(p0, p1, svc.roles)
    during = cpu_delta(p0, pm, svc.roles)
    load_s = tm - t0
    if "cpu_s" in gen:  # the load generator's own CPU over its test (its report); none if it wrote none
        cpu["locust"] = gen["cpu_s"]
    n = served(m1) - served(m0)
    window = t1 - t0
    per_query = {k: round(1e3 * v / n, 3) if n else None for k, v in cpu.items()}
    service_cpu = sum(cpu[k] for k in svc.roles)
    per_query["service"] = round(1e3 * service_cpu / n, 3) if n else None
    handled = sum(m1.get(f"count:total:{k}", 0) - m0.get(f"count:total:{k}", 0) for k in KINDS.values())
    handler_ms = 1e3 * sum(m1.get(f"sum:total:{k}", 0) - m0.get(f"sum:total:{k}", 0)
                           for k in KINDS.values()) / handled if handled else None
    errors = {k.split(":", 1)[1]: m1[k] - m0.get(k, 0) for k in m1 if k.startswith("errors:") and m1[k] > m0.get(k, 0)}
    all_ = stats.get("all", {})
    record = {
        "backend": svc.backend, "name": name, "mode": mode, "users": users, "rate": rate or None,
        "photo_share": photo_share, "seconds": seconds, "requests": all_.get("requests", 0),
        "rps": all_.get("rps"), "p50_ms": all_.get("p50_ms"), "p99_ms": all_.get("p99_ms"),
        "p999_ms": all_.get("p999_ms"), "mean_ms": all_.get("mean_ms"),
        "error_rate": (all_["failures"] / all_["requests"]) if all_.get("requests") else None,
        "by_kind": {k: v for k, v in stats.items() if k != "all"}, "history": history, "failures": failures[:5],
        "schedule": gen.get("schedule"), "served": n, "page_errors": errors,
        "resends": m1.get("resends", 0) - m0.get("resends", 0),
        "stages_ms": stage_means(m0, m1), "handler_ms": handler_ms,
        "outside_ms": (all_["mean_ms"] - handler_ms) if handler_ms is not None and all_.get("mean_ms") else None,
        "window_s": round(window, 2),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()}, "cpu_ms_per_query": per_query,
        "cores_busy": {**{k: round(during[k] / load_s, 3) for k in svc.roles},
                       "service": round(sum(during.values()) / load_s, 3),
                       "locust": round(cpu["locust"] / gen["wall_s"], 3) if gen.get("wall_s") and "locust" in cpu
                       else None, "machine": round((bm - b0) / load_s, 3)},
        "load_s": round(load_s, 2),
        **(extra or {}),
    }
    late = (gen.get("schedule") or {}).get("late", 0) / max(1, (gen.get("schedule") or {}).get("arrivals", 0))
    logger.info("  -> %.1f q/s, p50 %s ms, p99 %s ms, errors %s, CPU/query %s ms (page %s, triton %s, milvus %s, "
                "locust %s)%s", record["rps"] or 0, record["p50_ms"], record["p99_ms"], all_.get("failures"),
                per_query["service"], per_query.get("page"), per_query.get("triton"), per_query.get("milvus"),
                per_query.get("locust"), f", late arrivals {late:.1%}" if rate else "")
    return record


# -- each stage alone -----------------------------------------------------------------------------------------------

def closed_threads(workers: Sequence[Callable[[int], None]], n_items: int, seconds: float) -> dict:
    """Every worker (one thread each, made beforehand) calls its function on item after item for `seconds`."""
    stop, barrier = threading.Event(), threading.Barrier(len(workers) + 1)
    latencies: list[list[float]] = [[] for _ in workers]
    errors = [0] * len(workers)
    first_error: list[str] = []

    def run(i: int) -> None:
        j = (i * 7919) % n_items
        barrier.wait()
        while not stop.is_set():
            started = time.perf_counter()
            try:
                workers[i](j)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                errors[i] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}"[:300])
            latencies[i].append((time.perf_counter() - started) * 1e3)
            j = (j + 1) % n_items

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(workers))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    samples = [x for lat in latencies for x in lat]
    out = {"queries": len(samples), "qps": len(samples) / elapsed, "errors": sum(errors), "elapsed_s": elapsed,
           **({"first_error": first_error[0]} if first_error else {})}
    if samples:
        out.update(percentiles(samples))
    return out


def run_stage(label: dict, make_worker: Callable[[], Callable[[int], None]], n_items: int, concurrency: int,
              seconds: float, roles: dict[str, Role]) -> dict:
    """One stage alone at one concurrency: throughput, latency and the CPU per query of its server and our client."""
    workers = [make_worker() for _ in range(concurrency)]
    for worker in workers:  # first calls (metadata, channels) before the clock
        worker(0)
    p0, c0, b0 = processes(), _own_cpu(), machine_cpu()
    result = closed_threads(workers, n_items, seconds)
    p1, c1, b1 = processes(), _own_cpu(), machine_cpu()
    cpu = cpu_delta(p0, p1, roles)
    cpu["client"] = c1 - c0
    n = result["queries"]
    record = {**label, "concurrency": concurrency, **{k: round(v, 3) if isinstance(v, float) else v
                                                       for k, v in result.items()},
              "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
              "cpu_ms_per_query": {k: round(1e3 * v / n, 3) if n else None for k, v in cpu.items()},
              "machine_cores_busy": round((b1 - b0) / result["elapsed_s"], 3)}
    logger.info("  %s alone (%s) c=%d: %.1f q/s, p50 %.2f ms, p99 %.2f ms, server CPU %.2f ms/query%s",
                label["stage"], label.get("mode", "-"), concurrency, record["qps"], record.get("p50_ms", math.nan),
                record.get("p99_ms", math.nan), record["cpu_ms_per_query"].get("server") or math.nan,
                f", {record['errors']} errors ({record.get('first_error')})" if record["errors"] else "")
    return record


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def embed_all(encoder: TritonEncoder, workload: Workload, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Every text and photo of the workload embedded once (what Milvus alone searches with)."""
    texts = np.concatenate([encoder.embed_queries(workload.texts[i:i + batch])
                            for i in range(0, len(workload.texts), batch)])
    photos = (np.concatenate([encoder.embed_images(workload.photos[i:i + batch // 2])
                              for i in range(0, len(workload.photos), batch // 2)])
              if workload.photos else np.zeros((0, texts.shape[1]), np.float32))
    return texts, photos


def triton_alone(triton: TritonServer, tag: str, workload: Workload, sequence: list[tuple[str, int]],
                 concurrencies: Sequence[int], seconds: float, timeout_s: float) -> list[dict]:
    """Triton alone: the same texts and photos, one TritonEncoder per thread as the page has."""

    def make_worker() -> Callable[[int], None]:
        encoder = TritonEncoder(triton.grpc_url, "grpc", timeout_s=timeout_s, tag=tag)

        def call(j: int) -> None:
            kind, i = sequence[j]
            if kind == "photo":
                encoder.embed_images([workload.photos[i]])
            else:
                encoder.embed_queries([workload.texts[i]])
        return call

    roles = {"server": in_group(triton.process.pid)}
    return [run_stage({"backend": "triton", "stage": "triton", "mode": "embed"}, make_worker, len(sequence), c,
                      seconds, roles) for c in concurrencies]


def milvus_alone(backend: str, client, roles: dict[str, Role], vectors: tuple[np.ndarray, np.ndarray],
                 workload: Workload, sequence: list[tuple[str, int]], modes: Sequence[str],
                 concurrencies: Sequence[int], seconds: float, collection: str) -> list[dict]:
    """Milvus alone: the page's searches (top 100 with the scalar fields; hybrid = dense + BM25, one after the
    other as the page does them; photos dense) with the vectors embedded beforehand, one shared client."""
    record = serving.collection_record(client, collection)
    name = record.collection
    index = store.collection_index(client, name)
    text_vectors, photo_vectors = vectors
    out = []
    for mode in modes:
        def make_worker(mode: str = mode) -> Callable[[int], None]:
            def call(j: int) -> None:
                kind, i = sequence[j]
                if kind == "photo":
                    store.search(client, [photo_vectors[i]], DEPTH, name, "", index)
                    return
                store.search(client, [text_vectors[i]], DEPTH, name, "", index)
                if mode == "hybrid":
                    store.lexical_search(client, [workload.texts[i]], DEPTH, name, "")
            return call

        for c in concurrencies:
            out.append(run_stage({"backend": backend, "stage": "milvus", "mode": mode}, make_worker, len(sequence),
                                 c, seconds, roles))
    return out


@contextmanager
def lite_client(path: Path) -> Iterator:
    """The Lite file opened in this process (its engine a child of ours), closed and its engine stopped after,
    so the page can open it next (one process per file)."""
    client = store.connect(str(path))
    try:
        yield client
    finally:
        client.close()
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(str(path))


@contextmanager
def server_client(uri: str) -> Iterator:
    client = store.connect(uri)
    try:
        yield client
    finally:
        client.close()


# -- one backend ----------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    modes: list[str]
    open_modes: list[str]
    concurrency: list[int]
    open_fractions: list[float]
    stage_concurrency: list[int]
    seconds: float
    stage_seconds: float
    warmup_seconds: float
    photo_share: float
    photo_check: bool
    long_requests: int
    long_fraction: float
    long_max_seconds: float
    open_users_per_qps: float
    open_min_users: int
    seed: int


def saturation(points: list[dict], mode: str, photo_share: float) -> float:
    """The closed-loop throughput at c=16 (the highest concurrency measured below it otherwise)."""
    closed = [p for p in points if p["mode"] == mode and p.get("loop") == "closed" and p["photo_share"] == photo_share]
    at16 = [p for p in closed if p["users"] == 16]
    chosen = at16[0] if at16 else max(closed, key=lambda p: p["rps"] or 0)
    return float(chosen["rps"] or 0)


def service_points(svc: Service, plan: Plan, long_point: bool) -> list[dict]:
    points: list[dict] = []
    run_point(svc, "warmup", mode=plan.modes[0], users=max(plan.concurrency), seconds=plan.warmup_seconds,
              photo_share=plan.photo_share, seed=plan.seed)  # every page thread makes its Triton client first
    for mode in plan.modes:
        for c in plan.concurrency:
            points.append(run_point(svc, f"{mode}-c{c}", mode=mode, users=c, seconds=plan.seconds,
                                    photo_share=plan.photo_share, seed=plan.seed, extra={"loop": "closed"}))
        if mode not in plan.open_modes:
            continue
        sat = saturation(points, mode, plan.photo_share)
        for fraction in plan.open_fractions:
            rate = fraction * sat
            users = max(plan.open_min_users, math.ceil(rate * plan.open_users_per_qps))
            points.append(run_point(svc, f"{mode}-open{fraction:g}", mode=mode, users=users, seconds=plan.seconds,
                                    rate=rate, photo_share=plan.photo_share, seed=plan.seed,
                                    extra={"loop": "open", "fraction": fraction, "saturation_rps": sat}))
        if mode == plan.modes[0] and plan.photo_check and plan.photo_share > 0:
            points += photo_mix_check(svc, plan, mode)
        if mode == plan.modes[0] and long_point and plan.long_requests:
            rate = plan.long_fraction * sat
            seconds = min(plan.long_max_seconds, plan.long_requests / max(rate, 1e-9))
            users = max(plan.open_min_users, math.ceil(rate * plan.open_users_per_qps))
            points.append(run_point(svc, f"{mode}-open{plan.long_fraction:g}-long", mode=mode, users=users,
                                    seconds=seconds, rate=rate, photo_share=plan.photo_share, seed=plan.seed + 1,
                                    extra={"loop": "open", "fraction": plan.long_fraction, "saturation_rps": sat,
                                           "long": True}))
    return points


def photo_mix_check(svc: Service, plan: Plan, mode: str) -> list[dict]:
    """Issue #24's photo target: open loop at half the text-only saturation rate, text p99 with 20% photos vs
    without them."""
    c = 16 if 16 in plan.concurrency else max(plan.concurrency)
    text_only = run_point(svc, f"{mode}-text-c{c}", mode=mode, users=c, seconds=plan.seconds, photo_share=0.0,
                          seed=plan.seed, extra={"loop": "closed", "check": "text-only saturation"})
    rate = 0.5 * float(text_only["rps"] or 0)
    users = max(plan.open_min_users, math.ceil(rate * plan.open_users_per_qps))
    extra = {"loop": "open", "fraction": 0.5, "saturation_rps": text_only["rps"]}
    alone = run_point(svc, f"{mode}-text-open0.5", mode=mode, users=users, seconds=plan.seconds, rate=rate,
                      photo_share=0.0, seed=plan.seed, extra={**extra, "check": "text only"})
    mixed = run_point(svc, f"{mode}-mixed-open0.5t", mode=mode, users=users, seconds=plan.seconds, rate=rate,
                      photo_share=plan.photo_share, seed=plan.seed, extra={**extra, "check": "with photos"})
    return [text_only, alone, mixed]


def run_backend(backend: str, args: argparse.Namespace, plan: Plan, triton: TritonServer, workload: Workload,
                sequence: list[tuple[str, int]], workdir: Path, cores: int) -> tuple[list[dict], list[dict], dict]:
    """Milvus alone, then the service points, on one backend; returns (points, stage records, backend info)."""
    info: dict = {"backend": backend}
    server: MilvusServer | None = None
    try:
        if backend == "lite":
            uri = str(args.lite_db.resolve())
            milvus_roles = {"server": our_children()}
            clients = lite_client(args.lite_db.resolve())
        else:
            try:
                server = MilvusServer(args.server_data.resolve(), port=free_port()).start()
            except MilvusServerError as exc:
                raise SystemExit(f"error: {exc}. Is `make serve` running on {args.server_data}? This benchmark "
                                 "serves the data itself (to account its CPU): `make stop` first") from None
            uri = server.uri
            milvus_roles = {"server": in_group(server.process.pid)}
            clients = server_client(uri)
        with clients as client:
            try:
                record = serving.collection_record(client, args.collection)
            except store.StoreError as exc:
                hint = "make demo" if backend == "lite" else "make serve (once: it indexes the catalog)"
                raise SystemExit(f"error: {backend}: {exc}; the {backend} backend needs {hint}") from None
            info.update(uri=uri, collection=record.collection, fingerprint=record.fingerprint, tag=record.tag,
                        rows=store.count(client, record.collection),
                        index=list(store.collection_index(client, record.collection)),
                        lexical=store.has_lexical(client, record.collection))
            logger.info("%s: %s", backend, info)
            encoder = TritonEncoder(triton.grpc_url, "grpc", timeout_s=60, tag=record.tag)
            vectors = embed_all(encoder, workload)
            encoder.close()
            stages = milvus_alone(backend, client, milvus_roles, vectors, workload, sequence, plan.modes,
                                  plan.stage_concurrency, plan.stage_seconds, args.collection)
        page = PageServer(triton.grpc_url, uri, args.catalog, args.collection, args.timeout, free_port(),
                          workdir / f"page-{backend}.log", args.max_searches,
                          events=str(workdir / f"events-{backend}.db"))  # logging, as the page runs by default
        with page:
            roles: dict[str, Role] = {"page": lambda pid, ppid, pgrp: pid == page.process.pid,
                                      "triton": in_group(triton.process.pid)}
            roles["milvus"] = (in_group(page.process.pid) if server is None  # the Lite engine: the page's child
                               else in_group(server.process.pid))
            svc = Service(backend, page, roles, workload, workdir / backend, cores)
            points = service_points(svc, plan, long_point=backend == "server")
    finally:
        if server is not None:
            server.stop()
    return points, stages, info


# -- the report -----------------------------------------------------------------------------------------------------

def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def _stage_at(stages: list[dict], stage: str, backend: str, mode: str, c: int) -> dict | None:
    rows = [s for s in stages if s["stage"] == stage and (stage == "triton" or (s["backend"] == backend
                                                                                and s["mode"] == mode))]
    if not rows:
        return None
    exact = [s for s in rows if s["concurrency"] == c]
    return exact[0] if exact else max(rows, key=lambda s: s["concurrency"])


def _alone(stage: dict | None) -> dict | None:
    keys = ("qps", "p50_ms", "p99_ms", "concurrency")
    return stage and {**{k: stage.get(k) for k in keys}, "server_ms": stage["cpu_ms_per_query"]["server"],
                      "client_ms": stage["cpu_ms_per_query"]["client"]}


def summarize(points: list[dict], stages: list[dict], cores: int) -> list[dict]:
    """Per backend and mode: the numbers issue #24's targets are stated in, and what the bounds text reads."""
    out = []
    for backend in dict.fromkeys(p["backend"] for p in points):
        for mode in dict.fromkeys(p["mode"] for p in points if p["backend"] == backend):
            closed = {p["users"]: p for p in points if p["backend"] == backend and p["mode"] == mode
                      and p.get("loop") == "closed" and not p.get("check")}
            if not closed:
                continue
            c = 16 if 16 in closed else max(closed)
            top, one = closed[c], closed.get(1)
            triton = _stage_at(stages, "triton", backend, mode, c)
            milvus = _stage_at(stages, "milvus", backend, mode, c)
            parts = None
            if triton and milvus:
                parts = (triton["cpu_ms_per_query"]["server"] or 0) + (milvus["cpu_ms_per_query"]["server"] or 0)
            service = top["cpu_ms_per_query"]["service"]
            ceiling = 1e3 * cores / parts if parts else None
            row = {"backend": backend, "mode": mode, "c": c, "c1_p50_ms": one and one["p50_ms"],
                   "c1_p99_ms": one and one["p99_ms"], "c1_rps": one and one["rps"],
                   "c1_stages_ms": one and one["stages_ms"].get("text"), "c1_outside_ms": one and one["outside_ms"],
                   "rps": top["rps"], "p50_ms": top["p50_ms"], "p99_ms": top["p99_ms"],
                   "cpu_ms_per_query": top["cpu_ms_per_query"], "cores_busy": top["cores_busy"],
                   "parts_ms_per_query": parts, "triton_alone": _alone(triton), "milvus_alone": _alone(milvus),
                   "triton_alone_c1": _alone(_stage_at(stages, "triton", backend, mode, 1)),
                   "milvus_alone_c1": _alone(_stage_at(stages, "milvus", backend, mode, 1)),
                   "page_overhead_ms_per_query": (service - parts) if service is not None and parts else None,
                   "service_over_parts": (service / parts) if service is not None and parts else None,
                   "cpu_ceiling_rps": ceiling, "of_ceiling": (top["rps"] / ceiling) if ceiling and top["rps"] else None,
                   "scaling": (top["rps"] / one["rps"]) if one and one["rps"] else None,
                   "tail": (top["p99_ms"] / top["p50_ms"]) if top["p50_ms"] and top["p99_ms"] else None}
            checks = [p for p in points if p["backend"] == backend and p["mode"] == mode and p.get("check")]
            alone = next((p for p in checks if p["check"] == "text only"), None)
            mixed = next((p for p in checks if p["check"] == "with photos"), None)
            if alone and mixed:
                a, m = alone["by_kind"].get("text", {}).get("p99_ms"), mixed["by_kind"].get("text", {}).get("p99_ms")
                row["photo_check"] = {"rate": alone["rate"], "text_p99_alone_ms": a, "text_p99_mixed_ms": m,
                                      "ratio": (m / a) if a and m else None}
            out.append(row)
    return out


def bounds(row: dict, cores: int) -> str:
    """What bounds one backend and mode, from the numbers: where the CPU goes at c=16, what c=1 waits for."""
    busy, q = row["cores_busy"], row["cpu_ms_per_query"]
    used = (busy.get("service") or 0) + (busy.get("locust") or 0)
    share = ", ".join(f"{k} {busy.get(k) or 0:.2f}" for k in ("page", "triton", "milvus", "locust"))
    machine = f"; the machine {busy['machine']:.2f}" if busy.get("machine") is not None else ""
    text = (f"**{row['backend']}, {row['mode']}**: {_f(row['rps'])} q/s at c={row['c']}; the servers and locust keep "
            f"{used:.2f} of {cores} cores busy ({share}{machine}). ")
    per_query = (q.get("service") or 0) + (q.get("locust") or 0)
    if per_query:
        text += (f"At {_f(per_query)} ms of CPU per query (servers + locust) {cores} cores allow "
                 f"{_f(1e3 * cores / per_query)} q/s: ")
        text += ("**CPU-bound**. " if used >= 0.9 * cores else
                 f"the cores are {used / cores:.0%} busy, so the rest of the wait is a stage that works alone while "
                 "the others wait for it (one Python process under its GIL, Lite's single engine). ")
    triton, milvus = row.get("triton_alone"), row.get("milvus_alone")
    if triton and milvus and q.get("page"):
        text += (f"Per query: the page {_f(q['page'])} ms (one Python process: under the GIL it alone caps the "
                 f"service near {_f(1e3 / q['page'])} q/s; the Milvus client (gRPC, result decoding) costs "
                 f"{_f(milvus['client_ms'])} ms of it when measured alone), Triton {_f(q.get('triton'))} ms (alone at "
                 f"c={triton['concurrency']}: {_f(triton['server_ms'])}; at c=1: "
                 f"{_f((row.get('triton_alone_c1') or {}).get('server_ms'))}), Milvus {_f(q.get('milvus'))} ms (alone: "
                 f"{_f(milvus['server_ms'])}). Alone at c={triton['concurrency']}: Triton {_f(triton['qps'])} q/s, "
                 f"Milvus {_f(milvus['qps'])} q/s. ")
    stages = row.get("c1_stages_ms")
    if stages and row.get("c1_p50_ms"):
        text += (f"At c=1 (p50 {_f(row['c1_p50_ms'], 0)} ms, p99 {_f(row['c1_p99_ms'], 0)} ms) a text query's mean "
                 f"is embed {_f(stages.get('embed'))} + search {_f(stages.get('search'))} ms inside the handler "
                 f"(total {_f(stages.get('total'))}), plus {_f(row.get('c1_outside_ms'))} ms of HTTP, JSON and "
                 "threads.")
    return text


def write_markdown(path: Path, meta: dict, points: list[dict], stages: list[dict], summary: list[dict],
                   backends: dict[str, dict]) -> None:
    cores = meta["cores"]
    most = max((p["requests"] for p in points), default=0)
    lines = [
        "# The search service under load (issue #24)", "",
        f"`{meta['command']}` — {meta['started']}, {meta['duration_s'] / 60:.1f} min, commit {meta['commit']}, "
        f"{meta['machine']}. Load generator: locust {meta['locust']} (FastHttpUser, headless, on the same cores; "
        "its CPU reported apart). Points last "
        f"{meta['plan']['seconds']:g} s (stages alone {meta['plan']['stage_seconds']:g} s), chosen to keep the "
        "whole run under ~25 minutes here; locust's percentiles are rounded to whole ms under 100 ms (10 ms under "
        f"1 s). Clients: pymilvus {meta.get('pymilvus')}, tritonclient {meta.get('tritonclient')}, Milvus Lite "
        f"{meta.get('milvus_lite')}. p99.9 only where a point has >= {P999_MIN_REQUESTS:,} requests"
        + (f" (none here: the most any point had is {most:,})" if most < P999_MIN_REQUESTS
           else "") + ".", "",
        f"Queries: {meta['workload']['texts']} texts from {', '.join(meta['workload']['sets'])}, "
        f"{meta['workload']['photos']} photos (the catalog photos of the evaluation set's image queries), "
        f"{meta['plan']['photo_share']:.0%} of requests photos. Text: `GET /api/search?q=...&mode=MODE` (k=12, the "
        "page searches 100 deep for facets); photo: `POST /api/search/image` (always dense).", "",
        "Backends:",
    ]
    for b in backends.values():
        lines.append(f"- **{b['backend']}**: `{b['uri']}`, collection `{b['collection']}` ({b['rows']:,} rows, "
                     f"{b['index'][0]} {b['index'][1]}, BM25 {'yes' if b['lexical'] else 'no'}), model "
                     f"{b['fingerprint']}")
    lines += ["", "## Closed loop (users with no wait)", "",
              "| backend | mode | c | q/s | p50 ms | p99 ms | p99.9 ms | errors | text p50 / p99 | photo p50 / p99 | "
              "page: queue / embed / search / total ms (text) | "
              "HTTP mean - handler mean ms | cores busy (service + locust) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        if p.get("loop") != "closed":
            continue
        lines.append(_latency_row(p, [str(p["users"])]) + f" {_stages(p)} {_f(p['outside_ms'])} | "
                     f"{p['cores_busy']['service']:.2f} + {p['cores_busy']['locust'] or 0:.2f} |")
    lines += ["", "## Open loop (Poisson arrivals at a fixed rate: fractions of the c=16 throughput)", "",
              "Offered is the nominal rate; each user's schedule is seeded (the same draws at every point), so the "
              "requests sent differ from rate x time by the Poisson sampling error (about 1/sqrt(n)), the same way "
              "at every point with as many users. Late arrivals: sent more than 5 ms after their scheduled time "
              "because their user was still waiting for an answer (the loop closed for them).", "",
              "| backend | mode | offered q/s (x c=16) | users | achieved q/s | p50 ms | p99 ms | p99.9 ms | errors | "
              "text p50 / p99 | photo p50 / p99 | late arrivals | cores busy (service + locust) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        if p.get("loop") != "open":
            continue
        sched = p.get("schedule") or {}
        late = sched.get("late", 0) / max(1, sched.get("arrivals", 0))
        offered = (f"{_f(p['rate'])} (0.5 x text-only c=16)" if p.get("check") else
                   f"{_f(p['rate'])} ({p['fraction']:g}{', long' if p.get('long') else ''})")
        row = _latency_row(p, [offered, str(p["users"])])
        lines.append(row + f" {late:.1%} | {p['cores_busy']['service']:.2f} + "
                     f"{p['cores_busy']['locust'] or 0:.2f} |")
    lines += ["", "## Each stage alone (same queries, same photo share, threads in one client process)", "",
              "Triton: `TritonEncoder.embed_queries` / `embed_images`, one client per thread (as the page). Milvus: "
              "`store.search` top 100 with the scalar fields (vectors embedded beforehand), plus "
              "`store.lexical_search` in hybrid mode, one shared client. Server CPU: Triton's process group; Milvus's "
              "engine (Lite: the child of the client process; server: its process group).", "",
              "| stage | backend | mode | c | q/s | p50 ms | p99 ms | errors | server CPU ms/query "
              "| client CPU ms/query | machine cores busy |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['backend'] if s['stage'] == 'milvus' else '-'} | "
                     f"{s['mode'] if s['stage'] == 'milvus' else '-'} | {s['concurrency']} | {_f(s['qps'])} | "
                     f"{_f(s.get('p50_ms'), 2)} | {_f(s.get('p99_ms'), 2)} | {s['errors']} | "
                     f"{_f(s['cpu_ms_per_query']['server'], 2)} | {_f(s['cpu_ms_per_query']['client'], 2)} | "
                     f"{_f(s.get('machine_cores_busy'), 2)} |")
    lines += ["", "## CPU per query (ms of CPU per answered query, all processes of each server)", "",
              "Triton and Milvus in the service, and (in brackets) alone at the same concurrency; service = page + "
              "Triton + Milvus; parts = Triton alone + Milvus alone; the difference is what the whole adds: the "
              "page's own process, plus what each server spends more per query inside the service than alone.", "",
              "| backend | mode | point | page | Triton (alone) | Milvus (alone) | service | parts | service - parts "
              "| service / parts | locust | cores busy: service / machine |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        if p.get("check") or p.get("long"):
            continue
        q = p["cpu_ms_per_query"]
        c = p["users"] if p.get("loop") == "closed" else 16
        triton = _stage_at(stages, "triton", p["backend"], p["mode"], c)
        milvus = _stage_at(stages, "milvus", p["backend"], p["mode"], c)
        t_alone = triton and triton["cpu_ms_per_query"]["server"]
        m_alone = milvus and milvus["cpu_ms_per_query"]["server"]
        parts = t_alone + m_alone if t_alone is not None and m_alone is not None and q["service"] is not None else None
        label = f"c={p['users']}" if p.get("loop") == "closed" else f"open {p['fraction']:g}"
        lines.append(f"| {p['backend']} | {p['mode']} | {label} | {_f(q.get('page'), 2)} | "
                     f"{_f(q.get('triton'), 2)} ({_f(t_alone, 2)}) | {_f(q.get('milvus'), 2)} ({_f(m_alone, 2)}) | "
                     f"{_f(q['service'], 2)} | {_f(parts, 2)} | {_f(q['service'] - parts if parts else None, 2)} | "
                     f"{_f(q['service'] / parts if parts else None, 2)} | {_f(q.get('locust'), 2)} | "
                     f"{_f(p['cores_busy']['service'], 2)} / {_f(p['cores_busy'].get('machine'), 2)} |")
    lines += ["", "Parts alone are taken at the point's concurrency (open-loop points: c=16), or the highest "
              "measured below it. Alone, Triton batches the queue a concurrency builds (its CPU per query falls with "
              "concurrency); inside the service fewer of its requests overlap, so parts at the same concurrency are "
              "the components' best case.", "", "## Issue #24's targets, measured", "",
              "| backend | mode | c=1 p50 / p99 ms | c=16 q/s | c=16 / c=1 (>= 2) | CPU ceiling q/s | of ceiling "
              "(>= 70%) | c=16 p99 / p50 (<= 2) | service / parts CPU (<= 1.3) | text p99 with photos / without, "
              "open loop at half the text-only saturation (<= 1.5) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        check = r.get("photo_check")
        photo = (f"{_f(check['text_p99_mixed_ms'], 0)} / {_f(check['text_p99_alone_ms'], 0)} ms = "
                 f"{_f(check['ratio'], 2)} at {_f(check['rate'])} q/s") if check else "-"
        lines.append(f"| {r['backend']} | {r['mode']} | {_f(r['c1_p50_ms'], 0)} / {_f(r['c1_p99_ms'], 0)} | "
                     f"{_f(r['rps'])} | {_f(r['scaling'], 2)}x | {_f(r['cpu_ceiling_rps'])} | "
                     f"{_f(100 * r['of_ceiling'] if r['of_ceiling'] else None, 0)}% | {_f(r['tail'], 2)} | "
                     f"{_f(r['service_over_parts'], 2)} | {photo} |")
    lines += ["", f"CPU ceiling: {cores} cores / (Triton's + Milvus's CPU-seconds per query, each measured alone at "
              "the same concurrency): the throughput the components' own work allows on this machine.", "",
              "## What bounds it", ""]
    lines += [f"- {bounds(r, cores)}" for r in summary]
    lines += ["", "Per-stage means are the page's own histograms (`mmsearch_stage_seconds`): queue is the wait for one "
              "of the page's search slots (`--max-searches` searches at once; the rest wait in arrival order), embed "
              "the Triton call, search the Milvus calls (BM25 beside the embedding) plus fusion and facets, total the "
              "handler; the HTTP latency above adds the hop to a worker thread, HTTP and JSON.", ""]
    path.write_text("\n".join(lines))


def _latency_row(p: dict, cells: list[str]) -> str:
    kinds = p["by_kind"]
    text, photo = kinds.get("text", {}), kinds.get("photo", {})
    errors = f"{p['error_rate']:.2%}" if p["error_rate"] is not None else "-"
    mode = p["mode"] + (" (text only)" if p["photo_share"] == 0 else "")
    return (f"| {p['backend']} | {mode} | " + " | ".join(cells) + f" | {_f(p['rps'])} | {_f(p['p50_ms'], 0)} | "
            f"{_f(p['p99_ms'], 0)} | {_f(p['p999_ms'], 0)} | {errors} | {_f(text.get('p50_ms'), 0)} / "
            f"{_f(text.get('p99_ms'), 0)} | {_f(photo.get('p50_ms'), 0)} / {_f(photo.get('p99_ms'), 0)} |")


def _stages(p: dict) -> str:
    s = p["stages_ms"].get("text", {})
    return f"{_f(s.get('queue'))} / {_f(s.get('embed'))} / {_f(s.get('search'))} / {_f(s.get('total'))} |"


def plot(path: Path, points: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    series = dict.fromkeys((p["backend"], p["mode"]) for p in points)
    for n, (backend, mode) in enumerate(series):
        color = f"C{n}"  # one colour per series in every panel
        label = f"{backend}, {mode}"
        closed = sorted((p for p in points if p["backend"] == backend and p["mode"] == mode
                         and p.get("loop") == "closed" and not p.get("check")), key=lambda p: p["users"])
        opened = sorted((p for p in points if p["backend"] == backend and p["mode"] == mode and p.get("loop") == "open"
                         and not p.get("check") and not p.get("long")), key=lambda p: p["rate"])
        style = "-o" if backend == "server" else "--s"
        if closed:
            x = [p["users"] for p in closed]
            axes[0, 0].plot(x, [p["rps"] or 0 for p in closed], style, color=color, label=label)
            axes[1, 0].plot(x, [p["p99_ms"] or math.nan for p in closed], style, color=color, label=label)
        if opened:
            x = [p["rate"] for p in opened]
            axes[0, 1].plot(x, [p["rps"] or 0 for p in opened], style, color=color, label=label)
            axes[1, 1].plot(x, [p["p99_ms"] or math.nan for p in opened], style, color=color, label=label)
    rates = [p["rate"] for p in points if p.get("rate")]
    if rates:
        axes[0, 1].plot([0, max(rates)], [0, max(rates)], ":", color="grey", label="achieved = offered")
    concurrency = sorted({p["users"] for p in points if p.get("loop") == "closed"})
    for ax in axes[:, 0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.set_xlabel("concurrency (closed loop)")
    for ax in axes[:, 1]:
        ax.set_xlabel("offered rate, queries/s (open loop)")
    for ax in axes[0]:
        ax.set_ylabel("throughput, queries/s")
        ax.set_ylim(bottom=0)
    for ax in axes[1]:
        ax.set_ylabel("p99 latency, ms")
        ax.set_yscale("log")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("The search page under load (20% photo queries), 2 cores, locust on the same machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/service.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: short points and fewer of them ({QUICK}); results go to the work dir")
    p.add_argument("--backends", type=_names, default="lite,server",
                   help="lite: the page opens the Lite file; server: Lite served over TCP (the shared path)")
    p.add_argument("--modes", type=_names, default="hybrid,dense", help="text search modes, each a series of points")
    p.add_argument("--open-modes", type=_names, default="hybrid", help="modes that also get the open-loop series")
    p.add_argument("--concurrency", type=_ints, default="1,4,16,64", help="closed-loop concurrencies (locust users)")
    p.add_argument("--open-fractions", type=_floats, default="0.25,0.5,0.75,1,1.25",
                   help="open-loop arrival rates, as fractions of the closed-loop throughput at c=16")
    p.add_argument("--stage-concurrency", type=_ints, default="1,4,16", help="concurrencies of the stages alone")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each service point")
    p.add_argument("--stage-seconds", type=float, default=8.0, help="duration of each stage-alone point")
    p.add_argument("--warmup-seconds", type=float, default=8.0,
                   help="unrecorded load at the highest concurrency before a backend's points")
    p.add_argument("--photo-share", type=float, default=0.2, help="share of requests that are photo searches")
    p.add_argument("--no-photo-check", dest="photo_check", action="store_false",
                   help="skip the text-only points of the photo target (text p99 with and without photos)")
    p.add_argument("--long-requests", type=int, default=10_500,
                   help="one long open-loop point on the server path sized for this many requests (p99.9); 0: none")
    p.add_argument("--long-fraction", type=float, default=0.75, help="rate of the long point, as a fraction of c=16's")
    p.add_argument("--long-max-seconds", type=float, default=120.0, help="the long point lasts at most this long")
    p.add_argument("--open-users-per-qps", type=float, default=1.0,
                   help="open-loop users per offered query/s (each user then sends about once a second)")
    p.add_argument("--open-min-users", type=int, default=16, help="fewest users of an open-loop point")
    p.add_argument("--lite-db", type=Path, default=ROOT / "runs" / "milvus.db",
                   help="the Lite file of the lite backend (make demo's index)")
    p.add_argument("--server-data", type=Path, default=ROOT / "runs" / "milvus-server",
                   help="data directory of the shared server (make serve's index, served on a free port)")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository",
                   help="Triton model repository (served on free ports)")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog the photos and the page's images come from")
    p.add_argument("--collection", default=store.COLLECTION, help="serving name the page searches")
    p.add_argument("--timeout", type=float, default=5.0, help="the page's --timeout (its Triton and Milvus deadlines)")
    p.add_argument("--max-searches", type=int, default=None,
                   help="the page's --max-searches (searches at once; 0: no limit); default: the page's own")
    p.add_argument("--seed", type=int, default=0, help="seed of the query choice")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch: logs, locust CSVs, photos (default: a new temporary directory)")
    p.add_argument("--report", type=Path, default=None,
                   help="measure nothing: write OUT.md and OUT.png again from this run's JSON (OUT: the JSON's path "
                        "without .json unless --out)")
    p.add_argument("--out", type=Path, default=None,
                   help="results prefix: OUT.json, OUT.md, OUT.png (default: bench/results/service; with --quick "
                        "WORKDIR/service-quick)")
    argv = sys.argv[1:] if argv is None else argv
    if "--quick" in argv:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)  # string defaults go through their type too
    bad = [m for m in args.modes + args.open_modes if m not in ("hybrid", "dense")]
    if bad:
        p.error(f"modes are hybrid or dense, not {bad}")
    if set(args.backends) - {"lite", "server"}:
        p.error("backends are lite and server")
    return args


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def write_results(out: Path, meta: dict, backends: dict[str, dict], points: list[dict], stages: list[dict]) -> None:
    """OUT.json (everything measured), OUT.md and OUT.png."""
    summary = summarize(points, stages, meta["cores"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "backends": backends, "summary": summary,
                                                    "points": points, "stages": stages}, indent=1))
    write_markdown(out.with_suffix(".md"), meta, points, stages, summary, backends)
    plot(out.with_suffix(".png"), points)
    logger.info("wrote %s.{json,md,png}", out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.report is not None:  # tables and plot again from a run's JSON, nothing measured
        saved = json.loads(args.report.read_text())
        write_results(args.out or args.report.with_suffix(""), saved["meta"], saved["backends"], saved["points"],
                      saved["stages"])
        return 0
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mmsearch-service-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or (workdir / "service-quick" if args.quick else RESULTS / "service")
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.modes, [m for m in args.open_modes if m in args.modes], args.concurrency, args.open_fractions,
                args.stage_concurrency, args.seconds, args.stage_seconds, args.warmup_seconds, args.photo_share,
                args.photo_check, args.long_requests, args.long_fraction, args.long_max_seconds,
                args.open_users_per_qps, args.open_min_users, args.seed)
    cores = os.cpu_count() or 1
    started, wall = time.strftime("%Y-%m-%d %H:%M"), time.monotonic()
    logger.info("work dir %s; results %s.{json,md,png}", workdir, out)
    workload = load_workload(args.catalog, [DEFAULT_EVAL_SET, CODES_EVAL_SET, NAMES_EVAL_SET], workdir)
    sequence = workload.sequence(2000, args.photo_share, args.seed)
    points: list[dict] = []
    stages: list[dict] = []
    backends: dict[str, dict] = {}
    with TritonServer.on_free_ports(args.model_repository, log_file=workdir / "triton.log") as triton:
        stages += triton_alone(triton, "", workload, sequence, plan.stage_concurrency, plan.stage_seconds,
                               args.timeout)
        for backend in args.backends:
            got, stage_records, info = run_backend(backend, args, plan, triton, workload, sequence, workdir, cores)
            points += got
            stages += stage_records
            backends[backend] = info
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    command = "python bench/service.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    meta = {"command": command.strip(), "started": started, "duration_s": time.monotonic() - wall, "commit": commit,
            "cores": cores, "machine": f"{platform.machine()}, {cores} cores, Python {platform.python_version()}",
            "locust": _version("locust"), "tritonclient": _version("tritonclient"), "pymilvus": _version("pymilvus"),
            "milvus_lite": _version("milvus-lite"), "plan": plan.__dict__,
            "workload": {"texts": len(workload.texts), "photos": len(workload.photos), "sets": workload.sets},
            "workdir": str(workdir)}
    write_results(out, meta, backends, points, stages)
    logger.info("done in %.1f min", meta["duration_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
