"""The server-process lifecycle Triton and Milvus share (core.server_process), on a real child: python's http.server."""

import signal
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.server_process import ServerProcess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpError(RuntimeError):
    pass


@dataclass
class HttpServer(ServerProcess):
    name = "http.server"
    error = HttpError
    stop_timeout_s = 2.0  # stop_detached polls a pid that here is our own unreaped child: it waits this out

    port: int
    log_file: Path | None = None
    argv: tuple[str, ...] = ()

    def command(self):
        argv = self.argv or ("-m", "http.server", str(self.port), "--bind", "127.0.0.1")
        return [sys.executable, *argv], None, None

    def ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1) as r:
            return r.status == 200


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_start_waits_until_it_serves_and_stop_ends_it(tmp_path):
    server = HttpServer(_free_port(), tmp_path / "logs" / "http.log")
    with server:
        assert server.ready()
        pid = server.process.pid
    assert server.process.poll() is not None and not _alive(pid)
    assert (tmp_path / "logs" / "http.log").is_file()


def test_a_server_that_dies_at_start_is_an_error_naming_its_log(tmp_path):
    server = HttpServer(_free_port(), tmp_path / "dead.log", argv=("-c", "import sys; print('boom'); sys.exit(3)"))
    with pytest.raises(HttpError, match="exited with code 3.*dead.log"):
        server.start(timeout_s=10)
    assert "boom" in (tmp_path / "dead.log").read_text()


def test_a_server_that_never_serves_times_out_and_is_stopped(tmp_path):
    server = HttpServer(_free_port(), argv=("-c", "import time; time.sleep(60)"))
    started = time.monotonic()
    with pytest.raises(HttpError, match="not ready after 1s"):
        server.start(timeout_s=1)
    assert time.monotonic() - started < 10
    assert server.process.poll() is not None


def test_a_server_ignoring_its_stop_signal_is_killed_with_its_group(tmp_path):
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); import http.server as h; " \
               "h.HTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler).serve_forever()"
    port = _free_port()
    server = HttpServer(port, argv=("-c", stubborn.format(port=port)))
    server.stop_timeout_s = 1.0
    server.start(timeout_s=10)
    started = time.monotonic()
    server.stop()
    assert server.process.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_detach_leaves_a_pid_file_that_stop_detached_reads(tmp_path):
    pid_file = tmp_path / "http.pid"
    server = HttpServer(_free_port())
    server.serve(pid_file, timeout_s=10, detach=True, stop_hint="stop_detached")
    pid = int(pid_file.read_text())
    assert pid == server.process.pid and server.ready()
    HttpServer.stop_detached(pid_file)
    server.process.wait(5)  # reap it: it is our child here, not in real use
    assert not pid_file.exists() and not _alive(pid)
    HttpServer.stop_detached(pid_file)  # nothing left to stop: says so, does not fail
