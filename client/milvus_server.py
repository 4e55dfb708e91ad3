"""Run a real Milvus standalone server locally, without Docker: the step between Lite and the cluster.

    python -m client.milvus_server                 # foreground on 127.0.0.1:19530, data in runs/milvus-server
    python -m client.milvus_server --detach        # returns once it answers; writes a pid file
    python -m client.milvus_server --stop

The binary comes from PyPI's `milvus` package (2.3.5, its last release; Linux x86-64): standalone
Milvus with embedded etcd and local storage. Use it when more than one process needs the same
collections (the page, search.py and the indexer together), for HNSW, and for aliases (upgrades
without downtime). It has no BM25 (a 2.5 feature): lexical and hybrid search fall back to dense;
the compose cluster (docker/) runs 2.5.

Milvus 2.3.5 listens on every interface whatever its `*.ip` settings say (those only choose the
address it advertises; measured with `ss -ltn`): on a shared host, firewall its ports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.server_process import ServerProcess

logger = logging.getLogger("client.milvus_server")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / "runs" / "milvus-server"
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


class MilvusServerError(RuntimeError):
    pass


@dataclass
class MilvusServer(ServerProcess):
    """A `milvus run standalone` process in its own process group (the package's own wrapper leaves
    its child running when killed): `with MilvusServer(dir) as server:` starts it and waits until a
    client can list collections."""

    name = "Milvus"
    error = MilvusServerError
    stop_signal = signal.SIGTERM  # to the group, then SIGKILL: milvus ignores SIGTERM for a while
    start_timeout_s = 180.0
    stop_timeout_s = 15.0
    poll_s = 0.5

    data_dir: Path = DEFAULT_DATA_DIR
    host: str = "127.0.0.1"
    port: int = 19530
    process: subprocess.Popen | None = None
    health_port: int = 0  # chosen at start: the first free one from 9091

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"at {self.uri}"

    @property
    def log_file(self) -> Path:
        return Path(self.data_dir) / "logs" / "milvus.log"

    def command(self) -> tuple[list[str], dict, Path]:
        try:
            from milvus import MilvusServerConfig, _initialize_data_files
        except ImportError:
            raise MilvusServerError("the Milvus server binary is not installed: pip install 'milvus==2.3.5' "
                                    "(Linux x86-64; scripts/setup.sh installs it)") from None
        ports = self._etcd_ports()
        config = MilvusServerConfig(data_dir=str(self.data_dir), proxy_port=self.port, etcd_port=ports["client"])
        for component in COMPONENTS:  # the address each advertises to the others
            config.set(f"{component}.ip", self.host)
        # Its port check binds without SO_REUSEADDR, so a port a killed server left in TIME_WAIT reads as taken,
        # while Milvus itself can listen on it: check as Milvus binds.
        config.try_bind_port = _reusable_socket
        config.resolve()  # internal ports: the first free from each default; writes configs/milvus.yaml
        _initialize_data_files(config.base_data_dir)  # unpacks the binary once (about 100 MB)
        self.health_port, sock = config.resolve_port(9091)
        sock.close()
        base = Path(config.base_data_dir)
        self._embed_etcd_config(base, ports)
        binary = base / "bin" / "milvus"
        env = dict(os.environ, DEPLOY_MODE="STANDALONE", METRICS_PORT=str(self.health_port),
                   MILVUS_RUN_DIR=str(base / "run"))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(binary.parent), env.get("LD_LIBRARY_PATH")]))
        logger.info("starting Milvus standalone on %s (data %s, health :%d), log: %s", self.uri, base,
                    self.health_port, self.log_file)
        return [str(binary), "run", "standalone"], env, base

    def _etcd_ports(self) -> dict[str, int]:
        """The embedded etcd's client and peer ports, kept per data directory (its membership records the
        peer URL). Without a config file etcd takes 2379/2380 whatever Milvus is told: a second server on
        the host would die binding them."""
        saved = Path(self.data_dir) / "etcd-ports.json"
        if saved.is_file():
            ports = json.loads(saved.read_text())
            if all(_bindable(p) for p in ports.values()):
                return ports
        client = next(p for p in range(2379, 2479) if _bindable(p))
        peer = next(p for p in range(client + 1, client + 101) if _bindable(p))
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"client": client, "peer": peer}))
        return {"client": client, "peer": peer}

    @staticmethod
    def _embed_etcd_config(base: Path, ports: dict[str, int]) -> None:
        client, peer = f"http://127.0.0.1:{ports['client']}", f"http://127.0.0.1:{ports['peer']}"
        etcd = base / "configs" / "embedEtcd.yaml"
        etcd.write_text(f"name: default\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
                        f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                        f"initial-cluster: default={peer}\n")
        milvus_yaml = base / "configs" / "milvus.yaml"
        text = milvus_yaml.read_text()
        if "\n  config:\n    path:" not in text:  # etcd.config.path: the template has no such key
            text = text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd}\n", 1)
        milvus_yaml.write_text(text)

    def ready(self) -> bool:
        """Healthy and serving: /healthz says OK early, so a real client call decides."""
        from pymilvus import MilvusClient

        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
            if b"OK" not in r.read():
                return False
        client = MilvusClient(uri=self.uri, timeout=5)
        try:
            client.list_collections()
        finally:
            client.close()
        return True


def _reusable_socket(port: int) -> socket.socket | None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.milvus_server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR,
                   help="data directory: collections, etcd, logs (kept between starts)")
    p.add_argument("--port", type=int, default=19530, help="the gRPC/HTTP port clients connect to")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait until it serves")
    p.add_argument("--detach", action="store_true", help="return once it serves, leaving it running")
    p.add_argument("--stop", action="store_true", help="stop a server started with --detach")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    pid_file = args.data / "milvus.pid"
    if args.stop:
        MilvusServer.stop_detached(pid_file)
        return
    server = MilvusServer(args.data, port=args.port)
    server.serve(pid_file, args.timeout, args.detach,
                 f"python -m client.milvus_server --stop (clients: --milvus-uri {server.uri})")

if __name__ == "__main__":
    main()
