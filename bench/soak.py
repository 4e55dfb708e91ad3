"""Soak test: query_encoder and product_encoder under steady load for a few minutes, loopback only.

    python bench/soak.py --minutes 3 --concurrency 8

perf_analyzer runs in consecutive windows (half the time each ensemble) while the server's resident
memory (tritonserver plus its Python-backend stub processes) is sampled. Reports errors, p99 per
window and memory at start and end, to bench/results/soak.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.perf import locate_perf_analyzer, run_sweep, write_input_data  # noqa: E402
from core.catalog import DEFAULT_CATALOG  # noqa: E402
from export.serve import TritonServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        stack += children.get(p, [])
    return total / 1024


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="repository to serve")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog for the product inputs")
    p.add_argument("--minutes", type=float, default=3.0, help="total load time")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--window-ms", type=int, default=10000, help="one perf_analyzer window")
    p.add_argument("--out", type=Path, default=RESULTS, help="where soak.{md,json} go")
    args = p.parse_args(argv)
    binary, env = locate_perf_analyzer()
    tmp = Path(tempfile.mkdtemp())
    files = write_input_data(tmp, args.catalog, 200)
    server = TritonServer.on_free_ports(Path(args.model_repository), log_file=tmp / "soak_triton.log").start()
    memory, windows, stop = [], [], threading.Event()

    def sample():
        while not stop.is_set():
            memory.append((time.monotonic(), tree_rss_mb(server.process.pid)))
            stop.wait(2.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        for model, batch in (("query_encoder", 1), ("product_encoder", 16)):
            end = time.monotonic() + args.minutes * 30
            while time.monotonic() < end:
                try:
                    row = run_sweep(binary, env, model, "grpc", server.grpc_url, files[model], [args.concurrency],
                                    args.window_ms, tmp / "soak.csv", batch)[0]
                    windows.append({**row, "t_s": round(time.monotonic() - started, 1), "error": None})
                except RuntimeError as exc:
                    windows.append({"model": model, "t_s": round(time.monotonic() - started, 1),
                                    "error": str(exc)[-300:]})
        alive = server.process.poll() is None
    finally:
        stop.set()
        sampler.join()
        server.stop()
    stats = {m: [w for w in windows if w["model"] == m and not w["error"]]
             for m in ("query_encoder", "product_encoder")}
    result = {"minutes": args.minutes, "concurrency": args.concurrency, "server_alive": alive,
              "errors": [w for w in windows if w["error"]], "windows": windows,
              "rss_mb": {"first": memory[0][1], "after_warmup": memory[min(5, len(memory) - 1)][1],
                         "last": memory[-1][1], "max": max(m for _, m in memory)},
              "rss_series": [(round(t - started, 1), round(m, 1)) for t, m in memory]}
    phase_switch = next((w["t_s"] for w in windows if w["model"] == "product_encoder"), None)
    if phase_switch:  # memory at the end of each ensemble's first and last window: growth within a phase
        marks = [w["t_s"] for w in windows]
        result["rss_at_window_end_mb"] = [round(min(memory, key=lambda tm: abs(tm[0] - started - t))[1], 1)
                                          for t in marks]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Soak test", "", f"`python bench/soak.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
             f"{args.minutes} minutes at concurrency {args.concurrency} over gRPC on loopback (half query_encoder, "
             "half product_encoder with 16 products a request), real inputs.", "",
             f"- errors: {len(result['errors'])}; server alive at the end: {alive}",
             f"- server memory (tritonserver + stubs, RSS): {result['rss_mb']['first']:.0f} MB at start, "
             f"{result['rss_mb']['after_warmup']:.0f} MB after 10 s, {result['rss_mb']['last']:.0f} MB at the end "
             f"(max {result['rss_mb']['max']:.0f} MB)", "",
             "| model | window end (s) | items/s | p50 ms | p99 ms | server RSS MB |", "|---|---|---|---|---|---|"]
    rss = dict(zip([w["t_s"] for w in windows], result.get("rss_at_window_end_mb", [])))
    for model, rows in stats.items():
        lines += [f"| {model} | {w['t_s']} | {w['throughput']:.1f} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | "
                  f"{rss.get(w['t_s'], float('nan')):.0f} |" for w in rows]
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
