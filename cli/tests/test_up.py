"""``voicebus up``: embedded servers, four healthy services, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import redis

from voicebus.cli.embedded import EmbeddedNats, EmbeddedValkey

REPO = Path(__file__).resolve().parents[2]


def test_embedded_servers_run_in_their_own_session() -> None:
    """A terminal's Ctrl-C goes to its process group; the servers must not be in it."""
    valkey = EmbeddedValkey().start()
    nats_server = EmbeddedNats().start()
    try:
        assert redis.Redis.from_url(valkey.url).ping()
        for proc in (valkey.proc, nats_server.proc):
            assert proc is not None and os.getsid(proc.pid) != os.getsid(0)
    finally:
        valkey.stop()
        nats_server.stop()
    assert valkey.proc is not None and valkey.proc.poll() is not None
    assert nats_server.proc is not None and nats_server.proc.poll() is not None


def test_up_serves_and_stops_everything_on_sigint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "REDIS_URL", "DATABASE_URL")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "voicebus"), "up", "--home", str(tmp_path), "--port-base", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Database:" in line or "exited" in line:  # the banner's last line
                break
        out = "".join(lines)
        assert "voicebus is up" in out, out
        healthy = re.findall(r"(\S+) is healthy \((http://[^)]+)\)", out)
        assert {name for name, _ in healthy} == {"config", "call-control", "agent-runner", "ingress"}, out
        for _, url in healthy:
            assert httpx.get(url, timeout=5).status_code == 200
        pids = [int(p) for p in re.findall(r"started embedded \w+ .*? pid (\d+)", out)]
        assert len(pids) == 2, out  # NATS and Valkey
        # What the banner tells a newcomer to paste works as printed, from the checkout.
        first_key = re.search(r"First API key:\s+(.+)$", out, re.MULTILINE)
        assert first_key is not None, out
        assert "uv run" not in out
        made = subprocess.run(["bash", "-c", first_key.group(1).strip() + " --json"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        api_key = json.loads(made.stdout.strip().splitlines()[-1])["api_key"]
        admin = re.search(r"Admin API:\s+(http://\S+)/docs", out)
        assert admin is not None, out
        me = httpx.get(f"{admin.group(1)}/api/v1/organizations/me", headers={"Authorization": f"Bearer {api_key}"})
        assert me.status_code == 200 and me.json()["name"] == "My org", me.text
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "voicebus | stopped" in rest
        for _, url in healthy:
            try:
                httpx.get(url, timeout=1)
            except httpx.ConnectError:
                continue
            raise AssertionError(f"{url} still answers after the stack stopped")
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if proc.poll() is None:  # a failed assertion: stop the stack the way a user would, so no child outlives it
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
