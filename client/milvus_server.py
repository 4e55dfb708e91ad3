"""Run the shared local index: Milvus Lite 2.5.1 served over TCP, for several processes at once.

    python -m client.milvus_server                 # foreground on 127.0.0.1:19530, data in runs/milvus-server
    python -m client.milvus_server --detach        # returns once it answers; writes a pid file
    python -m client.milvus_server --stop

Milvus Lite is one process per file; served like this, the page, search.py, index.py, sync, upgrades
and evaluations all use the same collections at once, through the same client code as a Milvus
cluster (`--milvus-uri http://127.0.0.1:19530`). It is Lite's C++ engine: BM25 full-text and hybrid
search, FLAT / IVF_FLAT / AUTOINDEX (no HNSW), no aliases (client/serving.py routes serving names
itself). Why this engine and not PyPI's Milvus 2.3.5 or Lite 3.x: bench/results/milvus_engines.md.

The child is a small Python process holding Lite's file lock (so no in-process client can open the
same file meanwhile) around the `milvus` binary; both run in their own process group, ended together.
It listens on the address given (loopback by default), never on every interface unless told.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from core.server_process import ServerProcess

logger = logging.getLogger("client.milvus_server")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / "runs" / "milvus-server"
DB_FILE = "milvus.db"  # inside the data directory (Lite: [A-Za-z0-9.-_], at most 36 characters)
READY_TIMEOUT_S = 5  # whole seconds (pymilvus ignores a float timeout)


class MilvusServerError(RuntimeError):
    pass


@dataclass
class MilvusServer(ServerProcess):
    """Milvus Lite served over TCP, in its own process group: `with MilvusServer(dir) as server:` starts it
    and waits until a client can list collections."""

    name = "Milvus Lite server"
    error = MilvusServerError
    stop_signal = signal.SIGTERM
    start_timeout_s = 60.0
    stop_timeout_s = 10.0
    poll_s = 0.25

    data_dir: Path = DEFAULT_DATA_DIR
    host: str = "127.0.0.1"
    port: int = 19530

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"at {self.uri}"

    @property
    def db_file(self) -> Path:
        return Path(self.data_dir) / DB_FILE

    @property
    def log_file(self) -> Path:
        return Path(self.data_dir) / "milvus.log"

    def command(self) -> tuple[list[str], dict, Path]:
        import importlib.util

        if importlib.util.find_spec("milvus_lite") is None:
            raise MilvusServerError("Milvus Lite is not installed: pip install 'milvus-lite==2.5.1' "
                                    "(scripts/setup.sh installs it)")
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        logger.info("starting Milvus Lite on %s (data %s), log: %s", self.uri, self.db_file, self.log_file)
        args = [sys.executable, "-m", "client.milvus_server", "--child", "--data", str(self.data_dir),
                "--host", self.host, "--port", str(self.port)]
        return args, dict(os.environ), REPO_ROOT

    def ready(self) -> bool:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=self.uri, timeout=READY_TIMEOUT_S)
        try:
            client.list_collections(timeout=READY_TIMEOUT_S)
        finally:
            client.close()
        return True


def run_child(data_dir: Path, host: str, port: int) -> int:
    """The server's own process: take Lite's file lock, run the binary, end it on SIGTERM."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        from milvus_lite.server import Server

    server = Server(str(Path(data_dir) / DB_FILE), address=f"{host}:{port}")
    if not server.init() or not server.start():  # start() fails when another process holds the file
        print(f"error: cannot serve {Path(data_dir) / DB_FILE}: it is open in another process", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return server._p.wait()  # noqa: SLF001 - the binary: when it dies, so does this server
    finally:
        server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.milvus_server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"data directory: the collections ({DB_FILE}), the log and the pid file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=19530, help="the gRPC port clients connect to")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait until it serves")
    p.add_argument("--detach", action="store_true", help="return once it serves, leaving it running")
    p.add_argument("--stop", action="store_true", help="stop a server started with --detach")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the server process itself
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.child:
        return run_child(args.data, args.host, args.port)
    pid_file = args.data / "milvus.pid"
    if args.stop:
        MilvusServer.stop_detached(pid_file)
        return 0
    args.data.mkdir(parents=True, exist_ok=True)
    server = MilvusServer(args.data, host=args.host, port=args.port)
    server.serve(pid_file, args.timeout, args.detach,
                 f"python -m client.milvus_server --data {args.data} --stop (clients: --milvus-uri {server.uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
