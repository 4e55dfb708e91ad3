"""What logging every search costs the shopper: search latency with the event log on and off, side by side.

    .venv/bin/python bench/event_logging.py     # on the shared deployment (make serve)

Two pages (client/app.py) on the same Triton and Milvus (`make serve`'s, or --triton-url / --milvus-uri), one
logging to a fresh event store (client/events.py), one with --events ''. The same text queries (the evaluation
sets', hybrid mode, k=12, as the service benchmark sends them) at the same concurrency go to one page, then the
other, alternating which goes first, --runs times; each run's latencies are timed here per request (the load
generator's rounded percentiles would hide a few percent). The cost is the median over runs of the logging page's
p50 over the other's, and the same for p99; the store's size after it is reported too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.service import closed_threads  # noqa: E402
from client.events import EventStore  # noqa: E402
from client.page_process import PageServer  # noqa: E402
from core.catalog import DEFAULT_CATALOG  # noqa: E402
from core.queries import CODES_EVAL_SET, DEFAULT_EVAL_SET, NAMES_EVAL_SET, QuerySet  # noqa: E402
from core.server_process import free_port  # noqa: E402

logger = logging.getLogger("bench.event_logging")
RESULTS = ROOT / "bench" / "results"


def text_queries() -> list[str]:
    texts: list[str] = []
    for path in (DEFAULT_EVAL_SET, CODES_EVAL_SET, NAMES_EVAL_SET):
        texts += QuerySet.load(path).texts
    return list(dict.fromkeys(texts))


def worker(page: PageServer, texts: list[str], k: int):
    """A closed-loop user on one persistent connection: GET /api/search, the answer read whole, 200 required."""
    connection = http.client.HTTPConnection("127.0.0.1", page.port, timeout=30)

    def call(i: int) -> None:
        connection.request("GET", "/api/search?" + urllib.parse.urlencode({"q": texts[i], "k": k, "mode": "hybrid"}))
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {body[:200]!r}")

    return call


def measure(page: PageServer, texts: list[str], concurrency: int, seconds: float, k: int) -> dict:
    workers = [worker(page, texts, k) for _ in range(concurrency)]
    for w in workers:
        w(0)
    return closed_threads(workers, len(texts), seconds)


def write_results(out: Path, record: dict) -> None:
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    meta, runs = record["meta"], record["runs"]
    lines = [
        "# Event logging's cost on search latency",
        "",
        f"`{meta['command']}` at {meta['commit']}, {meta['started']}; {meta['machine']}. Two pages on one Triton and "
        f"one Milvus ({meta['milvus_uri']}), one logging every search to SQLite (client/events.py), one not; text "
        f"queries (hybrid, k={meta['k']}) at concurrency {meta['concurrency']}, {meta['seconds']:.0f} s per run, "
        "alternating which page goes first. Latency timed per request by the load generator (a persistent HTTP "
        "connection per user).",
        "",
        "| run | first | logging on: q/s | p50 ms | p99 ms | logging off: q/s | p50 ms | p99 ms | p50 on/off |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(runs, 1):
        on, off = run["on"], run["off"]
        lines.append(f"| {i} | {run['first']} | {on['qps']:.1f} | {on['p50_ms']:.2f} | {on['p99_ms']:.2f} | "
                     f"{off['qps']:.1f} | {off['p50_ms']:.2f} | {off['p99_ms']:.2f} | "
                     f"{on['p50_ms'] / off['p50_ms']:.3f} |")
    s = record["summary"]
    lines += [
        "",
        f"Median over {len(runs)} runs: p50 {s['p50_on_ms']:.2f} ms logging vs {s['p50_off_ms']:.2f} ms not: "
        f"**{100 * s['p50_cost']:+.1f}%** (the median of the per-run ratios: {100 * s['p50_cost_paired']:+.1f}%); "
        f"p99 {100 * s['p99_cost']:+.1f}%; throughput {100 * s['qps_cost']:+.1f}%. "
        f"Target: at most +5% on p50.",
        "",
        f"The store after the runs: {s['queries_logged']:,} searches logged, {s['store_bytes'] / 1e6:.1f} MB "
        f"({s['store_bytes'] / max(1, s['queries_logged']):.0f} bytes per search with its {meta['k']} served ids).",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python bench/event_logging.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC endpoint (make serve's)")
    p.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="Milvus (make serve's)")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="the pages' catalog (their product photos)")
    p.add_argument("--runs", type=int, default=5, help="runs per page (alternating)")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each run")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop users")
    p.add_argument("--k", type=int, default=12, help="results per search (the page's default)")
    p.add_argument("--workdir", type=Path, default=None, help="event store and logs (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=RESULTS / "event_logging", help="results: OUT.json and OUT.md")
    args = p.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mmsearch-events-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    texts = text_queries()
    events = workdir / "events.db"
    started = time.strftime("%Y-%m-%d %H:%M")
    pages = {"on": PageServer(args.triton_url, args.milvus_uri, args.catalog, port=free_port(),
                              log_file=workdir / "page-on.log", events=str(events)),
             "off": PageServer(args.triton_url, args.milvus_uri, args.catalog, port=free_port(),
                               log_file=workdir / "page-off.log", events="")}
    runs = []
    with pages["on"], pages["off"]:
        for name, page in pages.items():  # warm: connections, the collection loaded, the first queries
            measure(page, texts, args.concurrency, 3.0, args.k)
            logger.info("page %s warmed up (%s)", name, page.url)
        for i in range(args.runs):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            run = {"first": order[0]}
            for name in order:
                run[name] = measure(pages[name], texts, args.concurrency, args.seconds, args.k)
                logger.info("run %d, logging %s: %.1f q/s, p50 %.2f ms, p99 %.2f ms, %d errors", i + 1, name,
                            run[name]["qps"], run[name]["p50_ms"], run[name]["p99_ms"], run[name]["errors"])
                if run[name]["errors"]:
                    raise SystemExit(f"errors in run {i + 1} ({name}): {run[name].get('first_error')}")
            runs.append(run)
    median = {f"{m}_{name}": statistics.median(r[name][m] for r in runs)
              for m in ("p50_ms", "p99_ms", "qps") for name in ("on", "off")}
    store = EventStore(events, read_only=True)
    summary = {"p50_on_ms": median["p50_ms_on"], "p50_off_ms": median["p50_ms_off"],
               "p50_cost": median["p50_ms_on"] / median["p50_ms_off"] - 1,
               "p50_cost_paired": statistics.median(r["on"]["p50_ms"] / r["off"]["p50_ms"] for r in runs) - 1,
               "p99_cost": median["p99_ms_on"] / median["p99_ms_off"] - 1,
               "qps_cost": median["qps_on"] / median["qps_off"] - 1,
               "queries_logged": store.counts()["queries"],
               "store_bytes": sum(f.stat().st_size for f in workdir.glob("events.db*"))}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    command = "python bench/event_logging.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "commit": commit, "started": started,
            "machine": f"{platform.machine()}, Python {platform.python_version()}", "milvus_uri": args.milvus_uri,
            "k": args.k, "concurrency": args.concurrency, "seconds": args.seconds, "queries": len(texts)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, {"meta": meta, "runs": runs, "summary": summary})
    logger.info("p50 cost of logging: %+.1f%% (paired %+.1f%%); results in %s.{md,json}", 100 * summary["p50_cost"],
                100 * summary["p50_cost_paired"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
