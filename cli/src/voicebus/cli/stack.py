"""The four services as separate processes, with readable per-service log prefixes and health checks.

Used by ``voicebus up``, the demo and the end-to-end tests, so all three exercise the same start-up
path a deployment uses: each service is its own console script with its own environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from voicebus.cli.embedded import EmbeddedNats, EmbeddedValkey, free_port
from voicebus.telephony import parse_api_urls

COLORS = {"config": "35", "call-control": "33", "agent-runner": "36", "ingress": "32", "nats": "90", "valkey": "90"}


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str
    proc: subprocess.Popen[bytes] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    _pump: threading.Thread | None = None

    def start(self, out: IO[str] | None, color: bool) -> None:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._pump = threading.Thread(target=self._pump_lines, args=(out, color), daemon=True)
        self._pump.start()

    def _pump_lines(self, out: IO[str] | None, color: bool) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        prefix = f"{self.name:>12} | "
        if color:
            key = "agent-runner" if self.name.startswith("runner") else self.name
            prefix = f"\x1b[{COLORS.get(key, '37')}m{prefix}\x1b[0m"
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if out is not None:
                out.write(prefix + line + "\n")
                out.flush()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}: run `uv sync` first")
    return str(path)


@dataclass
class StackConfig:
    """Where the stack's servers are and where its services listen. Empty URL = start an embedded one."""

    home: Path = Path(".voicebus")
    nats_url: str | None = None
    redis_url: str | None = None
    database_url: str | None = None
    subject_prefix: str = "vb"
    ingress_port: int = 8080
    config_port: int = 8081
    runner_ports: tuple[int, ...] = (8082,)
    call_control_port: int = 8083
    runner_capacity: int = 4
    # Carrier REST base URLs by provider (the simulator's stand-ins in the demo and tests), merged over
    # VOICEBUS_CARRIER_API_URLS from the environment.
    carrier_api_urls: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, home: Path, env: Mapping[str, str] = os.environ, **kw: object) -> StackConfig:
        return cls(home=home, nats_url=env.get("NATS_URL") or None, redis_url=env.get("REDIS_URL") or None,
                   database_url=env.get("DATABASE_URL") or None, **kw)  # type: ignore[arg-type]

    @classmethod
    def free_ports(cls, runners: int = 1, **kw: object) -> StackConfig:
        return cls(ingress_port=free_port(), config_port=free_port(), call_control_port=free_port(),
                   runner_ports=tuple(free_port() for _ in range(runners)), **kw)  # type: ignore[arg-type]


class Stack:
    """Starts servers (embedded unless given) and the four services; stops everything on exit."""

    def __init__(self, cfg: StackConfig, out: IO[str] | None = sys.stdout, color: bool | None = None) -> None:
        self.cfg = cfg
        self.out = out
        self.color = (out is not None and out.isatty()) if color is None else color
        self.services: dict[str, ServiceProcess] = {}
        self._nats: EmbeddedNats | None = None
        self._valkey: EmbeddedValkey | None = None
        self.nats_url = ""
        self.redis_url = ""
        self.database_url = ""

    # ------------------------------------------------------------------ urls
    @property
    def ingress_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.ingress_port}"

    @property
    def ingress_ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.cfg.ingress_port}"

    @property
    def config_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.config_port}"

    def say(self, msg: str) -> None:
        if self.out is not None:
            self.out.write(f"{'voicebus':>12} | {msg}\n")
            self.out.flush()

    # ------------------------------------------------------------------ lifecycle
    def start_servers(self) -> None:
        home = self.cfg.home
        home.mkdir(parents=True, exist_ok=True)
        if self.cfg.nats_url:
            self.nats_url = self.cfg.nats_url
            self.say(f"using NATS at {self.nats_url}")
        else:
            self._nats = EmbeddedNats(store_dir=home / "nats", log_file=home / "nats.log").start()
            self.nats_url = self._nats.url
            self.say(f"started embedded NATS (JetStream) at {self.nats_url}, pid {self._nats.proc.pid}")
        if self.cfg.redis_url:
            self.redis_url = self.cfg.redis_url
            self.say(f"using Redis at {safe_url(self.redis_url)}")
        else:
            self._valkey = EmbeddedValkey(log_file=home / "valkey.log").start()
            self.redis_url = self._valkey.url
            self.say(f"started embedded Valkey at {self.redis_url}, pid {self._valkey.proc.pid}")
        if self.cfg.database_url:
            self.database_url = self.cfg.database_url
            self.say(f"using database {safe_url(self.database_url)}")
        else:
            self.database_url = f"sqlite+aiosqlite:///{(home / 'voicebus.db').resolve()}"
            self.say(f"using SQLite at {home / 'voicebus.db'}")

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "NATS_URL": self.nats_url,
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
            "VOICEBUS_SUBJECT_PREFIX": self.cfg.subject_prefix,
            "VOICEBUS_SECRET_KEY_FILE": str((self.cfg.home / "secret.key").resolve()),
            "VOICEBUS_HTTP_HOST": "127.0.0.1",
            "LOG_LEVEL": self.cfg.log_level,
            "PYTHONUNBUFFERED": "1",
        })
        urls = dict(self.cfg.carrier_api_urls)
        if urls:
            env["VOICEBUS_CARRIER_API_URLS"] = json.dumps(
                {**parse_api_urls(env.get("VOICEBUS_CARRIER_API_URLS")), **parse_api_urls(urls)})
        env.setdefault("VOICEBUS_PUBLIC_URL", self.ingress_url)  # outbound answer URLs point at this ingress
        env.update(self.cfg.extra_env)
        return env

    def _service(self, name: str, script: str, args: list[str], port_var: str, port: int,
                 extra: dict[str, str] | None = None) -> ServiceProcess:
        env = self.base_env()
        env[port_var] = str(port)
        env.update(extra or {})
        return ServiceProcess(name, [_script(script), *args], env, f"http://127.0.0.1:{port}/readyz")

    def start_services(self, timeout: float = 90.0) -> None:
        cfg = self.cfg
        plan = [self._service("config", "voicebus-config", ["serve"], "VOICEBUS_CONFIG_PORT", cfg.config_port),
                self._service("call-control", "voicebus-call-control", [], "VOICEBUS_CALL_CONTROL_PORT",
                              cfg.call_control_port)]
        for i, port in enumerate(cfg.runner_ports, start=1):
            name = "agent-runner" if len(cfg.runner_ports) == 1 else f"runner-{i}"
            plan.append(self._service(name, "voicebus-agent-runner", [], "VOICEBUS_RUNNER_PORT", port,
                                      {"VOICEBUS_RUNNER_CAPACITY": str(cfg.runner_capacity),
                                       "VOICEBUS_INSTANCE_ID": name}))
        plan.append(self._service("ingress", "voicebus-ingress", [], "VOICEBUS_INGRESS_PORT", cfg.ingress_port))
        for svc in plan:
            self.services[svc.name] = svc
            svc.start(self.out, self.color)
        self.wait_healthy(timeout)

    def restart_service(self, name: str, timeout: float = 60.0) -> None:
        svc = self.services[name]
        svc.signal(signal.SIGTERM)
        svc.wait(10)
        svc.start(self.out, self.color)
        self.wait_healthy(timeout, only=[name])

    def wait_healthy(self, timeout: float, only: list[str] | None = None) -> None:
        pending = {n: s for n, s in self.services.items() if only is None or n in only}
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while pending:
                for name, svc in list(pending.items()):
                    if not svc.alive:
                        raise RuntimeError(f"{name} exited during start-up:\n" + "\n".join(list(svc.tail)[-30:]))
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(svc.health_url).status_code == 200:
                            self.say(f"{name} is healthy ({svc.health_url})")
                            del pending[name]
                if pending and time.monotonic() > deadline:
                    names = ", ".join(pending)
                    tails = "\n".join(f"--- {n}:\n" + "\n".join(list(s.tail)[-15:]) for n, s in pending.items())
                    raise TimeoutError(f"not healthy after {timeout:.0f}s: {names}\n{tails}")
                if pending:
                    time.sleep(0.2)  # polling interval for an external process's health endpoint

    def stop(self, grace: float = 15.0) -> None:
        for svc in reversed(list(self.services.values())):
            svc.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for svc in self.services.values():
            if svc.wait(max(0.1, deadline - time.monotonic())) is None:
                svc.signal(signal.SIGKILL)
                svc.wait(5)
        if self._nats:
            self._nats.stop()
        if self._valkey:
            self._valkey.stop()

    @contextlib.contextmanager
    def running(self, timeout: float = 90.0) -> Iterator[Stack]:
        try:
            self.start_servers()
            self.start_services(timeout)
            yield self
        finally:
            self.stop()


def safe_url(url: str) -> str:
    """Drop the password from a URL before printing it."""
    from voicebus.observability.logs import redact

    return redact(url)
