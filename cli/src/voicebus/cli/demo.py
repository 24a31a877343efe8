"""``voicebus demo``: the whole product in one command, on the embedded stack.

It does what a new user would do by hand, through the same public surfaces: start the stack, create an
organization (``voicebus-config create-org``), an agent and a Cloudonix configuration (admin REST API),
then dial the agent as Cloudonix would (carrier simulator) and show what happened.
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

DEMO_DOMAIN = "demo.cloudonix.net"
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
    log_path = home / "stack.log"
    async with run_cloudonix_api({DEMO_DOMAIN: token}) as cloudonix:
        with log_path.open("w") as log:
            stack = Stack(StackConfig.free_ports(home=home, cloudonix_api_url=cloudonix.url), out=log, color=False)
            step(f"starting the embedded stack (service logs: {log_path})")
            try:
                await asyncio.to_thread(stack.start_servers)
                await asyncio.to_thread(stack.start_services)
                return await _call(stack, cloudonix.url, token, home, as_json)
            finally:
                step("stopping the stack")
                await asyncio.to_thread(stack.stop)


@dataclass
class Tenant:
    """What a user sets up before the first call: an org + key, a published agent, a Cloudonix config."""

    api_key: str
    agent_uuid: str
    telephony_config_id: int

    def stream_url(self, stack: Stack, call_id: str, domain: str = DEMO_DOMAIN) -> str:
        query = urlencode({"provider": "cloudonix", "Domain": domain, "callId": call_id,
                           "from": "+15555550100", "to": "+15555550199"})
        return f"{stack.ingress_ws_url}/api/v1/agent-stream/{self.agent_uuid}?{query}"


async def setup_tenant(stack: Stack, admin_url: str, token: str, *, concurrent_calls: int | None = None,
                       say: Callable[[str], None] = lambda _: None) -> Tenant:
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
    return Tenant(org["api_key"], agent["uuid"], int(tcfg["id"]))


async def _call(stack: Stack, cloudonix_url: str, token: str, home: Path, as_json: bool) -> int:
    for name, svc in stack.services.items():
        step(f"{name} healthy at {svc.health_url}")
    tenant = await setup_tenant(stack, stack.config_url, token, say=step)
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    async with httpx.AsyncClient(base_url=stack.config_url, headers=headers, timeout=10, trust_env=False) as admin:
        call_id = f"demo-{secrets.token_hex(4)}"
        url = tenant.stream_url(stack, call_id)
        wav = home / "call.wav"
        script = CallScript(domain=DEMO_DOMAIN, cloudonix_api=cloudonix_url, record_path=wav,
                            actions=[CallerAction.dtmf("1")], max_duration_s=90)
        step("placing a simulated Cloudonix call; the caller presses 1 when the agent stops speaking")
        report: CallReport = await place_call(url, script)
        run = await find_run(admin, call_id, agent_uuid=tenant.agent_uuid)

    if as_json:
        print(json.dumps({"call": report.to_dict(), "run": run}, indent=2, default=str))
    else:
        print()
        print("Call timeline (carrier simulator)")
        print(report.render())
        print()
        print("Final run record (GET /api/v1/runs/{id})")
        print(json.dumps(run, indent=2, default=str))
        print()
        print(f"Recording of what the caller heard: {wav.resolve()}")
    ok = run["state"] == "completed" and report.hung_up_by == "agent" and report.first_agent_audio_ms is not None
    if not ok:
        print(f"demo FAILED: run state {run['state']} ({run.get('end_reason')}), hung up by {report.hung_up_by}",
              file=sys.stderr)
    return 0 if ok else 1


def run_demo(home: Path, as_json: bool = False) -> int:
    try:
        return asyncio.run(_demo(home, as_json))
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError, httpx.HTTPError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
