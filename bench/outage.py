"""What the page answers while Milvus is down, request by request: hung (SIGSTOP), killed (kill -9 of its
process group) and restarted. Runs the page of any checkout, so one table can hold this one and an older one.

    python bench/outage.py --model-repository model_repository                  # this checkout
    git worktree add /tmp/before <commit>
    python bench/outage.py --page-root /tmp/before --label before --model-repository model_repository

Triton serves the repository (export.serve); the Milvus is the local Lite server (client/milvus_server.py)
in a temporary directory, with `--limit` catalog products indexed through Triton. Every request is a
real HTTP request to the page (client/app.py of `--page-root`), with a client-side limit of `--give-up`
seconds. Results: bench/results/outage.{json,md} (a run adds or replaces its label's rows).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.milvus_server import MilvusServer  # noqa: E402
from core.catalog import DEFAULT_CATALOG  # noqa: E402
from core.server_process import free_port  # noqa: E402
from export.serve import TritonServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def ask(url: str, give_up: float) -> dict:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=give_up) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (TimeoutError, urllib.error.URLError) as exc:
        status, body = "no answer", str(getattr(exc, "reason", exc)).encode()
    seconds = time.monotonic() - started
    try:
        text = json.loads(body)
        text = text.get("error") or (f"{len(text['hits'])} hits" if "hits" in text else json.dumps(text))
    except (ValueError, AttributeError):
        text = body.decode(errors="replace")
    return {"status": status, "seconds": round(seconds, 2), "answer": str(text)[:160]}


def at_once(urls: list[str], give_up: float) -> list[dict]:
    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(lambda u: ask(u, give_up), urls))


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []

    def record(phase: str, answers: list[dict], what: list[str]) -> None:
        for name, answer in zip(what, answers):
            rows.append({"label": args.label, "phase": phase, "request": name, **answer})
            print(f"{args.label:>8}  {phase:<22} {name:<8} {answer['status']!s:>9} {answer['seconds']:7.2f} s  "
                  f"{answer['answer'][:90]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp, \
            TritonServer.on_free_ports(args.model_repository, log_file=Path(tmp) / "triton.log") as triton:
        milvus = MilvusServer(Path(tmp) / "milvus", port=free_port()).start()
        subprocess.run([sys.executable, "client/index.py", "--catalog", args.catalog, "--limit", str(args.limit),
                        "--milvus-uri", milvus.uri, "--triton-url", triton.grpc_url], cwd=ROOT, check=True,
                       capture_output=True)
        port = free_port()
        page = subprocess.Popen([sys.executable, "client/app.py", "--triton-url", triton.grpc_url, "--milvus-uri",
                                 milvus.uri, "--port", str(port), "--catalog", args.catalog],
                                cwd=args.page_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        search, health = f"http://127.0.0.1:{port}/api/search?q=shirt&k=3", f"http://127.0.0.1:{port}/api/health"
        both, names = [search, search, health], ["search", "search", "health"]
        try:
            deadline = time.monotonic() + 120
            while ask(search, 5)["status"] != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the page did not answer a search within 120 s")
                time.sleep(0.5)
            record("up", [ask(search, args.give_up)], ["search"])
            os.killpg(milvus.process.pid, signal.SIGSTOP)
            try:
                record("milvus hung (SIGSTOP)", at_once(both, args.give_up), names)
            finally:
                os.killpg(milvus.process.pid, signal.SIGCONT)
            record("resumed (SIGCONT)", [ask(search, args.give_up)], ["search"])
            milvus.kill()
            record("milvus killed (kill -9)", at_once(both, args.give_up), names)
            record("still down", at_once(both, args.give_up), names)
            milvus = MilvusServer(milvus.data_dir, port=milvus.port).start()
            record("restarted", [ask(search, args.give_up)], ["search"])
            record("restarted", [ask(search, args.give_up)], ["search"])
        finally:
            page.terminate()
            page.wait(30)
            milvus.stop()
    return rows


def write(rows: list[dict], out: Path) -> None:
    path = out / "outage.json"
    kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["label"] != rows[0]["label"]]
    rows = kept + rows
    path.write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# The page during a Milvus outage, request by request", "",
             "`python bench/outage.py` (see its docstring): the page of each checkout against the local Lite "
             "server, which is hung (SIGSTOP), resumed, killed with kill -9 and restarted. Requests of one phase "
             "are sent at once. Every checkout runs with this checkout's installed packages (pymilvus, "
             "tritonclient), the page's default deadline (5 s), 500 products indexed from the fashion catalog.", "",
             "| checkout | phase | request | status | seconds | answer |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['phase']} | {r['request']} | {r['status']} | {r['seconds']:.2f} | "
              f"{' '.join(r['answer'].replace('|', '/').split())} |" for r in rows]
    (out / "outage.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository", help="what Triton serves")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog the products come from")
    p.add_argument("--limit", type=int, default=500, help="products indexed")
    p.add_argument("--page-root", type=Path, default=ROOT, help="checkout whose client/app.py is measured")
    p.add_argument("--label", default="this", help="the checkout's name in the table")
    p.add_argument("--give-up", type=float, default=60.0, help="seconds a request may take before the client "
                                                               "stops waiting (then: no answer)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for outage.json and outage.md")
    args = p.parse_args(argv)
    write(run(args), args.out)


if __name__ == "__main__":
    main()
