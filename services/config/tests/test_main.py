"""The ``voicebus-config`` console script as a real process: create-org, migrate, serve, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from voicebus.bus.subjects import Subjects
from voicebus.cli.embedded import free_port
from voicebus.config.crypto import SecretBox
from voicebus.config.db import create_engine, sessionmaker
from voicebus.config.main import main
from voicebus.config.migrate import upgrade
from voicebus.config.store import Store

SCRIPT = str(Path(sys.executable).parent / "voicebus-config")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICEBUS_", "DATABASE_URL"))}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'voicebus.db'}",
                "VOICEBUS_SECRET_KEY_FILE": str(tmp_path / "data" / "secret.key")})
    env.update(extra)
    return env


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Run ``main()`` in-process (a subprocess per variant costs seconds of imports) with a clean env."""
    env = _env(tmp_path)
    for k in list(os.environ):
        if k.startswith("VOICEBUS_") or k == "DATABASE_URL":
            monkeypatch.delenv(k)
    for k in ("DATABASE_URL", "VOICEBUS_SECRET_KEY_FILE"):
        monkeypatch.setenv(k, env[k])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield env
    root.handlers[:] = handlers  # main() installs its own log handler
    root.setLevel(level)


def test_create_org_prints_key_once_and_migrate_is_idempotent(
        cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VOICEBUS_DEFAULT_CONCURRENT_CALLS", "4")
    main(["create-org", "--name", "Acme", "--json"])
    out = capsys.readouterr()
    body = json.loads(out.out)
    assert body["name"] == "Acme" and body["concurrent_call_limit"] == 4 and body["api_key"].startswith("vbk_")
    assert body["api_key"] not in out.err
    assert (tmp_path / "data" / "secret.key").stat().st_mode & 0o777 == 0o600

    main(["create-org", "--name", "Beta", "--concurrent-calls", "2"])
    human = capsys.readouterr().out
    assert "API key (shown only this once" in human and "limit 2" in human
    main(["migrate"])  # at head already: no error

    monkeypatch.setenv("DATABASE_URL", "mysql://x/y")
    with pytest.raises(SystemExit) as e:
        main(["migrate"])
    assert e.value.code == 2 and "unsupported DATABASE_URL scheme 'mysql'" in capsys.readouterr().err
    monkeypatch.setenv("DATABASE_URL", cli_env["DATABASE_URL"])
    monkeypatch.setenv("VOICEBUS_SECRET_KEY", "not-a-key")
    with pytest.raises(SystemExit) as e:
        main(["create-org", "--name", "x"])
    assert e.value.code == 2 and "VOICEBUS_SECRET_KEY must be" in capsys.readouterr().err


async def test_serve_answers_then_stops_on_sigterm(tmp_path: Path, nats_url: str, redis_url: str,
                                                  subject_prefix: str, helpers: Any) -> None:
    port = free_port()
    env = _env(tmp_path, NATS_URL=nats_url, REDIS_URL=redis_url, VOICEBUS_SUBJECT_PREFIX=subject_prefix,
               VOICEBUS_CONFIG_PORT=str(port))
    engine = create_engine(env["DATABASE_URL"])
    await upgrade(engine)
    store = Store(sessionmaker(engine), SecretBox.generate(), 10)
    _org, key = await store.create_organization("Acme")
    await engine.dispose()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(SCRIPT, "serve", env=env, stdout=log, stderr=log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=2) as http:
            async def ready() -> bool:
                assert proc.returncode is None, "voicebus-config serve exited early: " + log_path.read_text()
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await helpers.eventually(ready, timeout=20, what="config /readyz")
            me = await http.get("/api/v1/organizations/me", headers={"Authorization": f"Bearer {key}"})
            assert me.status_code == 200 and me.json()["name"] == "Acme"
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
        output = log_path.read_text()
        assert code == 0, output
        assert "config service stopped" in output and key not in output
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_stream(Subjects(prefix=subject_prefix).events_stream)
        finally:
            await nc.close()
