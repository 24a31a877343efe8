"""The ``voicebus-call-control`` process: health endpoints, serving over NATS, clean SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import httpx
import nats
import pytest

from voicebus.bus.messages import (
    HangupRequest,
    HangupResult,
    LegRegister,
    LegRegistered,
    TelephonyCredentials,
    TelephonyCredentialsRequest,
)
from voicebus.bus.rpc import request, serve
from voicebus.bus.subjects import CFG_TELEPHONY_CREDENTIALS, CTL_HANGUP, CTL_LEG_REGISTER, Subjects
from voicebus.cli.embedded import free_port
from voicebus.simulator.cloudonix_api import run_cloudonix_api


async def test_process_serves_and_shuts_down_on_sigterm(nats_url: str, subject_prefix: str) -> None:
    subjects = Subjects(prefix=subject_prefix)
    port = free_port()
    nc = await nats.connect(nats_url)

    async def creds(_req: TelephonyCredentialsRequest) -> TelephonyCredentials:
        return TelephonyCredentials(telephony_config_id=1, organization_id=1, provider="cloudonix",
                                    credentials={"domain_id": "acme", "bearer_token": "tok-proc"})

    await serve(nc, subjects.cfg(CFG_TELEPHONY_CREDENTIALS), TelephonyCredentialsRequest, creds)
    async with run_cloudonix_api({"acme": "tok-proc"}) as cloudonix:
        cloudonix.state.add_session("acme", "proc-1")
        env = {**os.environ, "NATS_URL": nats_url, "VOICEBUS_SUBJECT_PREFIX": subject_prefix,
               "VOICEBUS_CALL_CONTROL_PORT": str(port), "VOICEBUS_CARRIER_API_URLS": f"cloudonix={cloudonix.url}",
               "LOG_LEVEL": "INFO"}
        exe = os.path.join(os.path.dirname(sys.executable), "voicebus-call-control")
        proc = await asyncio.create_subprocess_exec(exe, env=env, stderr=asyncio.subprocess.PIPE)
        try:
            async with httpx.AsyncClient(trust_env=False, base_url=f"http://127.0.0.1:{port}") as http:
                deadline = time.monotonic() + 20
                while True:  # wait for the condition "ready", bounded
                    assert proc.returncode is None, "call-control exited during start-up"
                    try:
                        ready = await http.get("/readyz")
                        if ready.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "call-control never became ready"
                    await asyncio.sleep(0.1)
                assert ready.json()["checks"] == {"nats": True, "serving": True}
                assert (await http.get("/healthz")).json() == {"service": "call-control", "status": "alive"}
            leg = await request(nc, subjects.ctl(CTL_LEG_REGISTER), LegRegister(
                call_id="proc0001", run_id=1, organization_id=1, telephony_config_id=1, carrier_call_id="proc-1",
                confirm=True), LegRegistered, timeout=10)
            assert leg.confirmed
            res = await request(nc, subjects.ctl(CTL_HANGUP), HangupRequest(
                call_id="proc0001", run_id=1, organization_id=1, reason="agent_hangup"), HangupResult, timeout=15)
            assert res.outcome == "hung_up"
            assert cloudonix.state.sessions["proc-1"].state == "ended"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            assert proc.stderr is not None
            log = (await proc.stderr.read()).decode()
            assert "stopped" in log and "tok-proc" not in log
            assert f"carrier API base URLs: cloudonix={cloudonix.url}" in log
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            js = nc.jetstream()
            for cleanup in (js.delete_stream(subjects.events_stream),
                            *(js.delete_key_value(f"{subject_prefix}_ctl_{b}") for b in ("actions", "legs", "replay"))):
                try:
                    await cleanup
                except Exception:
                    pass
            await nc.close()


@pytest.mark.parametrize(("value", "message"), [
    ("cloudonx=http://127.0.0.1:1", "unknown provider(s) in carrier API URLs: cloudonx"),
    ("cloudonix=ftp://x", "carrier API URL of cloudonix must be an http(s) URL"),
    ('{"cloudonix": ', "VOICEBUS_CARRIER_API_URLS"),
])
async def test_a_bad_carrier_api_url_setting_stops_start_up(value: str, message: str) -> None:
    env = {**os.environ, "VOICEBUS_CARRIER_API_URLS": value, "NATS_URL": "nats://127.0.0.1:1"}
    exe = os.path.join(os.path.dirname(sys.executable), "voicebus-call-control")
    proc = await asyncio.create_subprocess_exec(exe, env=env, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 1
    assert "call-control: invalid settings: VOICEBUS_CARRIER_API_URLS" in text and message in text
    assert "Traceback" not in text
