"""The search page (client/app.py) as a child process: benchmarks, the simulated shoppers and tests start it
this way, with the lifecycle of every server here (core/server_process.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from client import store
from core.catalog import DEFAULT_CATALOG
from core.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class PageServer(ServerProcess):
    """client/app.py in a session of its own: `with PageServer(...)` starts it and waits until /api/health is 200."""

    name = "search page"
    error = RuntimeError
    start_timeout_s = 240.0
    stop_timeout_s = 20.0

    triton_url: str = "127.0.0.1:8001"
    milvus_uri: str = str(ROOT / "runs" / "milvus.db")
    catalog: str = DEFAULT_CATALOG
    collection: str = store.COLLECTION
    timeout_s: float = 5.0
    port: int = 8080
    log_file: Path | None = None
    max_searches: int | None = None  # None: the page's default
    events: str = ""  # the event store (--events); "": nothing is logged
    explore_share: float = 0.0
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"at {self.url} (Milvus {self.milvus_uri})"

    def command(self) -> tuple[list[str], dict, Path]:
        env = dict(os.environ)
        env.pop("MILVUS_URI", None)  # pymilvus reads it at import and refuses a Lite path in it
        args = [sys.executable, "client/app.py", "--triton-url", self.triton_url, "--milvus-uri", self.milvus_uri,
                "--collection", self.collection, "--catalog", str(self.catalog), "--port", str(self.port),
                "--timeout", str(self.timeout_s), "--events", str(self.events),
                "--explore-share", str(self.explore_share), *self.extra_args]
        if self.max_searches is not None:
            args += ["--max-searches", str(self.max_searches)]
        return args, env, ROOT

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/api/health", timeout=10) as response:
            return response.status == 200

    def warm_up(self, timeout_s: float = 180.0) -> None:
        """Searches until one is answered: a page on a Milvus Lite file loads the collection at its first
        searches, and those fail while it loads; traffic starts on a page that answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/search?q=shirt&k=1", timeout=30) as response:
                    if response.status == 200:
                        return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the page at {self.url} answered no search in {timeout_s:.0f} s: "
                                       f"{exc}") from exc
            time.sleep(1.0)
