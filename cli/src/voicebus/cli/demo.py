"""``voicebus demo``: the whole product in one command, on the embedded stack.

It does what a new user would do by hand, through the same public surfaces: start the stack, create an
organization (``voicebus-config create-org``), an agent, a Cloudonix and a Twilio configuration and a
phone number (admin REST API), then places one call on every carrier path that works, at the same time,
with the simulator playing each carrier's cloud:

- Cloudonix on Agent Stream (the carrier dials the agent's stream URL);
- Twilio inbound (Twilio posts its signed webhook, follows voicebus's TwiML to a per-call media socket);
- Twilio outbound (``POST /api/v1/telephony/initiate-call``; the callee answers and presses 1).

It prints one summary table, each call's run record, and where each recording is.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from voicebus.bus.agent import demo_definition
from voicebus.cli.stack import Stack, StackConfig
from voicebus.simulator.call import CallerAction, CallReport, CallScript, place_call
from voicebus.simulator.cloudonix_api import run_cloudonix_api
from voicebus.simulator.phone import PhoneScript
from voicebus.simulator.twilio.dial import InboundCall, dial_inbound
from voicebus.simulator.twilio.rest import Callee, RunningTwilioApi, run_twilio_api

DEMO_DOMAIN = "demo.cloudonix.net"
DEMO_TWILIO_SID = "AC" + "de30" * 8
DEMO_TWILIO_NUMBER = "+15005550006"  # the number callers dial; routed to the demo agent
DEMO_TWILIO_FROM = "+15005550010"  # the caller id of outbound calls
DEMO_CALLEE = "+15005550199"  # who the outbound call rings
TERMINAL = {"completed", "failed"}


def step(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def create_org(stack: Stack, name: str, concurrent_calls: int | None = None) -> dict[str, Any]:
    argv = [str(Path(sys.executable).parent / "voicebus-config"), "create-org", "--name", name, "--json"]
    if concurrent_calls is not None:
        argv += ["--concurrent-calls", str(concurrent_calls)]
    out = subprocess.run(argv, env=stack.base_env(), capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"voicebus-config create-org failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def find_run(admin: httpx.AsyncClient, call_id: str, *, agent_uuid: str | None = None,
                   terminal: bool = True, timeout: float = 20.0) -> dict[str, Any]:
    """Poll the admin API (as a user would) for the run of ``call_id``; with ``terminal``, until it ended."""
    params: dict[str, Any] = {"limit": 200, **({"agent_uuid": agent_uuid} if agent_uuid else {})}
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while True:
        resp = await admin.get("/api/v1/runs", params=params)
        resp.raise_for_status()
        for run in resp.json():
            if (run.get("gathered_context") or {}).get("call_id") == call_id:
                last = run
                if not terminal or run["state"] in TERMINAL:
                    return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"run for call {call_id} not {'terminal' if terminal else 'found'} after "
                               f"{timeout:.0f}s (last seen: {last})")
        await asyncio.sleep(0.25)  # polling interval of another process's API


def _fresh_dir(home: Path) -> None:
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)


async def _demo(home: Path, as_json: bool) -> int:
    _fresh_dir(home)
    token = secrets.token_urlsafe(24)
    twilio_token = secrets.token_hex(16)
    log_path = home / "stack.log"
    async with run_cloudonix_api({DEMO_DOMAIN: token}) as cloudonix, \
            run_twilio_api(DEMO_TWILIO_SID, twilio_token, [DEMO_TWILIO_NUMBER, DEMO_TWILIO_FROM],
                           record_dir=home / "twilio") as twilio:
        with log_path.open("w") as log:
            cfg = StackConfig.free_ports(home=home, carrier_api_urls={"cloudonix": cloudonix.url,
                                                                      "twilio": twilio.url})
            stack = Stack(cfg, out=log, color=False)
            step(f"starting the embedded stack (service logs: {log_path})")
            try:
                await asyncio.to_thread(stack.start_servers)
                await asyncio.to_thread(stack.start_services)
                return await _calls(stack, cloudonix.url, token, twilio, twilio_token, home, as_json)
            finally:
                step("stopping the stack")
                await asyncio.to_thread(stack.stop)


@dataclass
class Tenant:
    """What a user sets up before the first call: an org + key, a published agent, carrier configurations."""

    api_key: str
    agent_uuid: str
    telephony_config_id: int
    twilio_config_id: int | None = None

    def stream_url(self, stack: Stack, call_id: str, domain: str = DEMO_DOMAIN) -> str:
        query = urlencode({"provider": "cloudonix", "Domain": domain, "callId": call_id,
                           "from": "+15555550100", "to": "+15555550199"})
        return f"{stack.ingress_ws_url}/api/v1/agent-stream/{self.agent_uuid}?{query}"


async def setup_tenant(stack: Stack, admin_url: str, token: str, *, concurrent_calls: int | None = None,
                       twilio_token: str | None = None, say: Callable[[str], None] = lambda _: None) -> Tenant:
    """With ``twilio_token``, also a Twilio configuration and the phone number that routes to the agent."""
    org = create_org(stack, "Demo organization", concurrent_calls)
    say(f"created organization {org['organization_id']} and its API key (voicebus-config create-org)")
    headers = {"Authorization": f"Bearer {org['api_key']}"}
    async with httpx.AsyncClient(base_url=admin_url, headers=headers, timeout=10, trust_env=False) as admin:
        resp = await admin.post("/api/v1/agents", json={"name": "Demo receptionist",
                                                        "definition": demo_definition().model_dump()})
        resp.raise_for_status()
        agent = resp.json()
        (await admin.post(f"/api/v1/agents/{agent['uuid']}/publish")).raise_for_status()
        say(f"created and published agent {agent['name']!r} ({agent['uuid']})")
        resp = await admin.post("/api/v1/telephony-configurations", json={
            "provider": "cloudonix", "name": "Demo Cloudonix domain",
            "credentials": {"domain_id": DEMO_DOMAIN, "bearer_token": token}})
        resp.raise_for_status()
        tcfg = resp.json()
        say(f"created Cloudonix configuration {tcfg['id']} for {DEMO_DOMAIN} "
            f"(token stored encrypted, shown as {tcfg['credentials']['bearer_token']})")
        twilio_id: int | None = None
        if twilio_token is not None:
            resp = await admin.post("/api/v1/telephony-configurations", json={
                "provider": "twilio", "name": "Demo Twilio account", "credentials": {
                    "account_sid": DEMO_TWILIO_SID, "auth_token": twilio_token, "from_numbers": [DEMO_TWILIO_FROM]}})
            resp.raise_for_status()
            twilio_cfg = resp.json()
            twilio_id = int(twilio_cfg["id"])
            resp = await admin.post("/api/v1/phone-numbers", json={
                "telephony_configuration_id": twilio_id, "number": DEMO_TWILIO_NUMBER, "agent_uuid": agent["uuid"]})
            resp.raise_for_status()
            say(f"created Twilio configuration {twilio_id} (auth token shown as "
                f"{twilio_cfg['credentials']['auth_token']}) and routed {DEMO_TWILIO_NUMBER} to the agent")
    return Tenant(org["api_key"], agent["uuid"], int(tcfg["id"]), twilio_id)


@dataclass
class PathResult:
    """One demo call: which carrier path, what the simulated phone saw, and the run voicebus recorded."""

    path: str
    run: dict[str, Any] | None
    first_audio_ms: int | None
    duration_ms: int
    recording: str | None
    error: str | None = None
    detail: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.run is not None and self.run["state"] == "completed"
                and self.run.get("end_reason") == "agent_hangup" and self.first_audio_ms is not None)


async def _cloudonix(stack: Stack, tenant: Tenant, admin: httpx.AsyncClient, cloudonix_url: str,
                     home: Path) -> PathResult:
    call_id = f"demo-{secrets.token_hex(4)}"
    wav = home / "cloudonix-agent-stream.wav"
    script = CallScript(domain=DEMO_DOMAIN, cloudonix_api=cloudonix_url, record_path=wav,
                        actions=[CallerAction.dtmf("1")], max_duration_s=90)
    report: CallReport = await place_call(tenant.stream_url(stack, call_id), script)
    run = await find_run(admin, call_id, agent_uuid=tenant.agent_uuid, timeout=30)
    return PathResult("Cloudonix Agent Stream", run, report.first_agent_audio_ms, report.duration_ms,
                      str(wav.resolve()) if wav.exists() else None, report.error, report.to_dict())


async def _twilio_inbound(stack: Stack, tenant: Tenant, admin: httpx.AsyncClient, twilio: RunningTwilioApi,
                          twilio_token: str, home: Path) -> PathResult:
    wav = home / "twilio-inbound.wav"
    call = InboundCall(voicebus=stack.ingress_url, account_sid=DEMO_TWILIO_SID, auth_token=twilio_token,
                       to=DEMO_TWILIO_NUMBER, from_="+15005550100", twilio_api=twilio.url,
                       phone=PhoneScript(actions=[CallerAction.dtmf("1")], max_duration_s=90, record_path=wav))
    report = await dial_inbound(call)
    run = await find_run(admin, call.call_sid, agent_uuid=tenant.agent_uuid, timeout=30)
    stream = report.stream
    return PathResult("Twilio inbound (webhook, TwiML)", run, stream.first_agent_audio_ms if stream else None,
                      stream.duration_ms if stream else 0, str(wav.resolve()) if wav.exists() else None,
                      report.error, report.to_dict())


async def _twilio_outbound(tenant: Tenant, admin: httpx.AsyncClient, twilio: RunningTwilioApi) -> PathResult:
    twilio.state.set_callee(DEMO_CALLEE, Callee("answer", dtmf="1"))
    resp = await admin.post("/api/v1/telephony/initiate-call", json={"agent_uuid": tenant.agent_uuid,
                                                                       "to": DEMO_CALLEE})
    if resp.status_code != 201:
        return PathResult("Twilio outbound (initiate-call)", None, None, 0, None,
                          f"initiate-call answered {resp.status_code}: {resp.text[:200]}")
    sid = resp.json()["carrier_call_id"]
    run = await find_run(admin, sid, agent_uuid=tenant.agent_uuid, timeout=120)
    call = twilio.state.calls[sid]
    report = call.reports[-1] if call.reports else None
    return PathResult("Twilio outbound (initiate-call)", run, report.first_agent_audio_ms if report else None,
                      report.duration_ms if report else 0, call.recording_path, None, call.inspection())


def _table(results: list[PathResult]) -> str:
    rows = [("path", "run", "state / reason", "first audio", "duration", "recording")]
    for r in results:
        run = r.run or {}
        rows.append((r.path, run.get("name", "-"), f"{run.get('state', '-')} / {run.get('end_reason') or r.error}",
                     f"{r.first_audio_ms} ms" if r.first_audio_ms is not None else "-",
                     f"{r.duration_ms / 1000:.1f} s", r.recording or "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def _calls(stack: Stack, cloudonix_url: str, token: str, twilio: RunningTwilioApi, twilio_token: str,
                 home: Path, as_json: bool) -> int:
    for name, svc in stack.services.items():
        step(f"{name} healthy at {svc.health_url}")
    tenant = await setup_tenant(stack, stack.config_url, token, twilio_token=twilio_token, say=step)
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    async with httpx.AsyncClient(base_url=stack.config_url, headers=headers, timeout=10, trust_env=False) as admin:
        step("placing three simulated calls at once: Cloudonix Agent Stream, Twilio inbound, Twilio outbound; "
             "each caller presses 1 when the agent stops speaking")
        results = list(await asyncio.gather(
            _cloudonix(stack, tenant, admin, cloudonix_url, home),
            _twilio_inbound(stack, tenant, admin, twilio, twilio_token, home),
            _twilio_outbound(tenant, admin, twilio)))

    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    else:
        for r in results:
            print()
            print(f"Run record of the {r.path} call (GET /api/v1/runs/{{id}})")
            print(json.dumps(r.run, indent=2, default=str))
        print()
        print(_table(results))
    failed = [r for r in results if not r.ok]
    for r in failed:
        run = r.run or {}
        print(f"demo FAILED on {r.path}: run {run.get('state')} ({run.get('end_reason')}), error {r.error}",
              file=sys.stderr)
    return 0 if not failed else 1


def run_demo(home: Path, as_json: bool = False) -> int:
    try:
        return asyncio.run(_demo(home, as_json))
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError, httpx.HTTPError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
