"""The Cloudonix REST stand-in, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from voicebus.simulator.call import CallScript, SimulatorError, place_call
from voicebus.simulator.cloudonix_api import RunningCloudonixApi, run_cloudonix_api

TOKEN = "tok-acme-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api() -> AsyncIterator[tuple[RunningCloudonixApi, httpx.AsyncClient]]:
    async with run_cloudonix_api({"acme": TOKEN, "other.example.com": "tok-other"}) as running:
        async with httpx.AsyncClient(base_url=running.url, trust_env=False, timeout=5) as http:
            yield running, http


def session_path(domain: str, session: str) -> str:
    return f"/customers/self/domains/{domain}/sessions/{session}"


async def test_session_lifecycle_as_cloudonix_answers(api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    running, http = api
    r = await http.post("/_sim/sessions", json={"domain": "acme", "session": "s1", "from": "+1555", "to": "+1666"})
    assert r.status_code == 201 and r.json()["domain"] == "acme.cloudonix.net"

    r = await http.get(session_path("acme.cloudonix.net", "s1"), headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["token"] == "s1" and body["domain"] == "acme.cloudonix.net" and body["callerId"] == "+1555"
    # Bare and fully qualified domain names are the same domain, as on Cloudonix.
    assert (await http.get(session_path("acme", "s1"), headers=AUTH)).status_code == 200

    assert (await http.get(session_path("acme", "s1"))).status_code == 401
    assert (await http.get(session_path("acme", "s1"), headers={"Authorization": "Bearer nope"})).status_code == 401
    assert (await http.get(session_path("acme", "s1"), headers={"Authorization": TOKEN})).status_code == 401
    other = {"Authorization": "Bearer tok-other"}
    assert (await http.get(session_path("other.example.com", "s1"), headers=other)).status_code == 404
    assert (await http.get(session_path("acme", "nope"), headers=AUTH)).status_code == 404
    assert (await http.get(session_path("unknown", "s1"), headers=AUTH)).status_code == 401

    r = await http.delete(session_path("acme", "s1"), headers=AUTH)
    assert r.status_code == 204
    assert (await http.delete(session_path("acme", "s1"), headers=AUTH)).status_code == 404
    assert (await http.get(session_path("acme", "s1"), headers=AUTH)).status_code == 404

    state = (await http.get("/_sim/sessions/s1")).json()
    assert state["state"] == "ended" and state["ended_by"] == "rest" and state["hung_up_at"]
    assert state["deletes"] == 2
    statuses = [(q["method"], q["status"]) for q in state["requests"]]
    assert statuses == [("GET", 200), ("GET", 200), ("GET", 401), ("GET", 401), ("GET", 401),
                        ("DELETE", 204), ("DELETE", 404), ("GET", 404)]
    assert running.state.sessions["s1"].state == "ended"
    assert [(q.method, q.status) for q in running.state.unmatched] == [("GET", 404), ("GET", 404), ("GET", 401)]


async def test_admin_errors(api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    _, http = api
    r = await http.post("/_sim/sessions", json={"domain": "nobody", "session": "x"})
    assert r.status_code == 404 and "POST /_sim/domains" in r.json()["message"]
    assert (await http.post("/_sim/sessions", json={"domain": "acme", "session": "dup"})).status_code == 201
    assert (await http.post("/_sim/sessions", json={"domain": "acme", "session": "dup"})).status_code == 409
    assert (await http.post("/_sim/sessions", json={"domain": "acme", "session": "a/b"})).status_code == 422
    assert (await http.post("/_sim/domains", json={"domain": "x", "bearer_token": ""})).status_code == 422
    assert (await http.get("/_sim/sessions/none")).status_code == 404
    generated = (await http.post("/_sim/sessions", json={"domain": "acme"})).json()["session"]
    assert len(generated) == 32
    r = await http.post("/_sim/domains", json={"domain": "New.Example.com.", "bearer_token": "t2"})
    assert r.status_code == 201 and r.json() == {"domain": "new.example.com"}


async def test_injected_failures_and_latency(api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    _, http = api
    await http.post("/_sim/sessions", json={"domain": "acme", "session": "f1"})
    r = await http.post("/_sim/behaviour", json={"fail_next": [503, 500], "delay_ms": 100})
    assert r.json() == {"delay_ms": 100, "fail_next": [503, 500]}
    t0 = time.monotonic()
    assert (await http.delete(session_path("acme", "f1"), headers=AUTH)).status_code == 503
    assert time.monotonic() - t0 >= 0.1
    assert (await http.delete(session_path("acme", "f1"), headers=AUTH)).status_code == 500
    assert (await http.delete(session_path("acme", "f1"), headers=AUTH)).status_code == 204


async def test_wait_ended_long_poll_returns_when_the_call_is_hung_up(
        api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    _, http = api
    await http.post("/_sim/sessions", json={"domain": "acme", "session": "w1"})
    waiter = asyncio.create_task(http.get("/_sim/sessions/w1", params={"wait_ended": 10}))
    # The long-poll must still be waiting while the session is live.
    done, _ = await asyncio.wait({waiter}, timeout=0.2)
    assert not done
    t0 = time.monotonic()
    assert (await http.delete(session_path("acme", "w1"), headers=AUTH)).status_code == 204
    r = await asyncio.wait_for(waiter, 5)
    assert r.json()["state"] == "ended" and time.monotonic() - t0 < 1.0


async def test_caller_end_makes_rest_hangup_see_404(api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    _, http = api
    await http.post("/_sim/sessions", json={"domain": "acme", "session": "c1"})
    r = await http.post("/_sim/sessions/c1/end")
    assert r.json()["ended_now"] is True and r.json()["ended_by"] == "caller"
    assert (await http.post("/_sim/sessions/c1/end")).json()["ended_now"] is False
    assert (await http.delete(session_path("acme", "c1"), headers=AUTH)).status_code == 404


async def test_simulated_call_registers_and_ends_its_session(
        api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    """With the stand-in, a call's session exists while it runs; the caller's hang-up ends it."""
    from websockets.asyncio.server import ServerConnection, serve

    running, http = api
    states: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.recv()
        states.append(running.state.sessions["sim-1"].state)
        with contextlib.suppress(Exception):
            async for _ in ws:
                pass

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        report = await place_call(f"ws://127.0.0.1:{port}/x", CallScript(
            domain="acme", session="sim-1", hangup_after_s=0.2, cloudonix_api=running.url))
    assert states == ["active"]
    assert report.hung_up_by == "caller"
    s = (await http.get("/_sim/sessions/sim-1")).json()
    assert s["state"] == "ended" and s["ended_by"] == "caller" and s["from"] == "+15555550100"

    with pytest.raises(SimulatorError, match="409"):
        await place_call("ws://127.0.0.1:9/x", CallScript(domain="acme", session="sim-1", cloudonix_api=running.url))


async def test_rest_hangup_ends_the_simulated_call(api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    """Hanging up through the REST API makes the carrier send stop and close, as Cloudonix does."""
    from websockets.asyncio.server import ServerConnection, serve

    running, http = api
    got: list[dict] = []

    async def handler(ws: ServerConnection) -> None:
        import json

        await ws.recv()
        await ws.recv()
        r = await http.delete(session_path("acme", "rest-1"), headers=AUTH)
        assert r.status_code == 204
        async for raw in ws:
            msg = json.loads(raw)
            if msg["event"] == "stop":
                got.append(msg)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        report = await place_call(f"ws://127.0.0.1:{port}/x", CallScript(
            domain="acme", session="rest-1", max_duration_s=10, cloudonix_api=running.url))
    assert report.end_cause == "rest_hangup" and report.hung_up_by == "agent"
    assert report.first("rest_hangup") is not None and len(got) == 1
    assert report.duration_ms < 3000


async def test_cli_runs_the_stand_in_and_stops_on_sigterm(tmp_path: object) -> None:
    from voicebus.cli.embedded import free_port

    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "voicebus-sim")
    proc = await asyncio.create_subprocess_exec(
        exe, "cloudonix-api", "--port", str(port), "--domain", "acme", "--token", "t",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        lines = []
        while b"listening" not in (line := await asyncio.wait_for(proc.stdout.readline(), 15)):
            assert line, "the stand-in exited before listening"
            lines.append(line.decode())
        assert "acme.cloudonix.net registered" in "".join(lines)
        async with httpx.AsyncClient(trust_env=False) as http:
            r = await http.get(f"http://127.0.0.1:{port}/_sim/healthz")
        assert r.json()["domains"] == ["acme.cloudonix.net"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
