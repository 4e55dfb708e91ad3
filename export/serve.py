"""Run a real Triton server on a model repository, locally (the `--backend python` flavour).

    python -m export.serve --model-repository model_repository            # foreground, Ctrl-C stops
    python -m export.serve --model-repository model_repository --detach   # writes a pid file, returns when ready
    python -m export.serve --stop

The `tritonserver` binary comes from the PyPI package nvidia-pytriton, installed in the serving
environment (.venv-serve, made by scripts/setup.sh). Its Python-backend stub takes its Python from
the first `python3` on PATH, so the serving environment's bin/ goes first: the models then import
onnxruntime, tokenizers and Pillow from there, and never torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from core.server_process import ServerProcess, free_port

logger = logging.getLogger("export.serve")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVE_ENV = REPO_ROOT / ".venv-serve"
DEFAULT_RUN_DIR = REPO_ROOT / "runs" / "triton"


class ServerError(RuntimeError):
    pass


def _serve_python(serve_env: Path) -> tuple[Path, dict]:
    python = serve_env / "bin" / "python3"
    if not python.exists():
        raise ServerError(f"no serving environment at {serve_env}: run ./scripts/setup.sh (or make setup)")
    info = subprocess.run(
        [str(python), "-c", "import sys, sysconfig, json; print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
         "'libdir': sysconfig.get_config_var('LIBDIR'), 'site': sysconfig.get_paths()['purelib']}))"],
        check=True, capture_output=True, text=True)
    return python, json.loads(info.stdout)


def locate_tritonserver(serve_env: Path = DEFAULT_SERVE_ENV) -> tuple[Path, Path, dict]:
    """(tritonserver binary, backends dir, environment) from nvidia-pytriton in `serve_env`.

    Installs the Python-backend stub that matches the environment's Python, once.
    """
    python, info = _serve_python(serve_env)
    root = Path(info["site"]) / "pytriton" / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.exists():
        raise ServerError(f"tritonserver not found at {binary}: is nvidia-pytriton installed in {serve_env}?")
    stub = root / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():
        source = root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
        if not source.exists():
            raise ServerError(f"nvidia-pytriton ships no Python-backend stub for Python {info['version']}")
        shutil.copy2(source, stub)
    libs = [info["libdir"], str(Path(info["site"]) / "nvidia_pytriton.libs")]
    env = dict(os.environ)
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return binary, root / "backends", env


@dataclass
class TritonServer(ServerProcess):
    """A tritonserver process: `with TritonServer(repo) as server:` starts it and waits for readiness."""

    name = "tritonserver"
    error = ServerError
    stop_signal = signal.SIGINT  # Triton drains in-flight requests on SIGINT
    signal_group = False  # and then ends its Python-backend stubs itself
    stop_timeout_s = 30.0

    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None
    serve_env: Path = DEFAULT_SERVE_ENV
    model_control: str = "none"  # "explicit": load/unload through the (restricted) repository API
    admin_key: str | None = None  # protects model-repository/shared-memory APIs when set
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @classmethod
    def on_free_ports(cls, model_repository: Path, **kwargs) -> TritonServer:
        """A server on three free loopback ports (tests, benchmarks: never a clash with one already running)."""
        return cls(Path(model_repository), http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                   **kwargs)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def address(self) -> str:
        return f"at http {self.http_url}, grpc {self.grpc_url}"

    def command(self) -> tuple[list[str], dict, None]:
        binary, backends, env = locate_tritonserver(self.serve_env)
        args = [
            str(binary), f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control}",
            "--log-verbose=0", "--exit-on-error=true", "--strict-readiness=true",
        ]
        if self.model_control == "explicit":
            args.append("--load-model=*")
        if self.admin_key:
            restricted = f"model-repository,shared-memory,logging,trace:admin-key={self.admin_key}"
            args += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        logger.info("starting tritonserver on %s (http %d, grpc %d, metrics %d), log: %s",
                    self.host, self.http_port, self.grpc_port, self.metrics_port, self.log_file)
        return args + self.extra_args, env, None

    def ready(self) -> bool:
        with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as response:
            return response.status == 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="Triton model repository to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP, gRPC and metrics endpoints bind to (0.0.0.0 exposes them)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--serve-env", type=Path, default=DEFAULT_SERVE_ENV,
                   help="virtual environment with nvidia-pytriton and the Python-backend dependencies")
    p.add_argument("--model-control", choices=("none", "explicit"), default="none",
                   help="explicit: models can be loaded/unloaded through the repository API")
    p.add_argument("--admin-key", default=os.environ.get("TRITON_ADMIN_KEY"),
                   help="key required by the model-repository and shared-memory APIs (env TRITON_ADMIN_KEY)")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="where the log and pid files go")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    p.add_argument("--detach", action="store_true", help="return once the server is ready, leaving it running")
    p.add_argument("--stop", action="store_true", help="stop a server started with --detach")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    pid_file = args.run_dir / "tritonserver.pid"
    if args.stop:
        TritonServer.stop_detached(pid_file)
        return
    server = TritonServer(Path(args.model_repository), args.host, args.http_port, args.grpc_port,
                          args.metrics_port, args.run_dir / "tritonserver.log", args.serve_env,
                          args.model_control, args.admin_key)
    server.serve(pid_file, args.timeout, args.detach, "python -m export.serve --stop")

if __name__ == "__main__":
    main()
