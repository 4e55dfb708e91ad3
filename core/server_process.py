"""A server we start as a child process: Triton (export.serve) and Milvus standalone (client.milvus_server).

One lifecycle for both: the child runs in its own session (so a stop reaches everything it forks,
and a Ctrl-C in our terminal does not reach it first), readiness is polled until a real call
succeeds or the child dies, a stop signals and then kills, and a `--detach` run leaves a pid file
that `--stop` reads. Subclasses say how to launch, what "ready" means and how to be stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for test and benchmark servers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """Base of the server dataclasses; `with Server(...) as server:` starts it and waits until it serves."""

    name = "server"
    error: type[Exception] = RuntimeError  # what start() raises when the server dies or never serves
    stop_signal = signal.SIGTERM
    signal_group = True  # signal the whole process group, or the main process alone (it then ends its children)
    start_timeout_s = 120.0
    stop_timeout_s = 15.0
    poll_s = 0.25
    process: subprocess.Popen | None = None
    log_file: Path | None = None

    @property
    def address(self) -> str:
        """Where clients reach it, for the log."""
        return ""

    def command(self) -> tuple[list[str], dict, Path | None]:
        """(argv, environment, working directory) of the server."""
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the server answers a real request; may raise while it is starting."""
        raise NotImplementedError

    def start(self, timeout_s: float | None = None):
        args, env, cwd = self.command()
        if self.log_file is not None:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own descriptor
        self.wait_ready(self.start_timeout_s if timeout_s is None else timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise self.error(f"{self.name} exited with code {self.process.returncode}; see {self.log_file}")
            try:
                if self.ready():
                    logger.info("%s ready %s", self.name, self.address)
                    return
            except Exception:  # noqa: BLE001 - not up yet, whatever its client library raises
                pass
            time.sleep(self.poll_s)
        self.stop()
        raise self.error(f"{self.name} not ready after {timeout_s:.0f}s; see {self.log_file}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pid = self.process.pid
        _signal(pid, self.stop_signal, self.signal_group)
        try:
            self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            _signal(pid, signal.SIGKILL, group=True)
            self.process.wait()
        if self.signal_group:
            _signal(pid, signal.SIGKILL, group=True)  # whatever it forked and left behind

    def kill(self) -> None:
        """kill -9 of the whole group, as a crash would (tests)."""
        if self.process is not None and self.process.poll() is None:
            _signal(self.process.pid, signal.SIGKILL, group=True)
            self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the --detach / --stop command line --------------------------------------------------

    def serve(self, pid_file: Path, timeout_s: float, detach: bool, stop_hint: str) -> None:
        """Start; with `detach` return once it serves (pid in `pid_file`), else run until Ctrl-C."""
        try:
            self.start(timeout_s)
        except self.error as exc:
            raise SystemExit(f"error: {exc}") from exc
        if detach:
            Path(pid_file).write_text(str(self.process.pid))
            logger.info("%s detached (pid %d); stop with: %s", self.name, self.process.pid, stop_hint)
            return
        try:
            self.process.wait()
        except KeyboardInterrupt:
            self.stop()

    @classmethod
    def stop_detached(cls, pid_file: Path) -> None:
        """Stop the server a `--detach` run left behind, as stop() would."""
        if not Path(pid_file).exists():
            logger.info("no detached %s (%s missing)", cls.name, pid_file)
            return
        pid = int(Path(pid_file).read_text())
        try:
            _signal(pid, cls.stop_signal, cls.signal_group)
            deadline = time.monotonic() + cls.stop_timeout_s
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # not our child: it is gone once this raises
                time.sleep(0.25)
            _signal(pid, signal.SIGKILL, group=True)
        except ProcessLookupError:
            pass
        Path(pid_file).unlink(missing_ok=True)
        logger.info("stopped %s (pid %d)", cls.name, pid)


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:
        pass
