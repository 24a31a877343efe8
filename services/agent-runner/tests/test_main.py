"""``voicebus-agent-runner`` as a process: health, a real call, and SIGTERM draining it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

import httpx
from nats.aio.client import Client as NATS

from voicebus.bus.agent import AgentDefinition, FlowNode, ScriptedFlow
from voicebus.bus.subjects import Subjects
from voicebus.cli.embedded import free_port

from .conftest import FakeCallControl, FakeIngress

FLOW = AgentDefinition(greeting="Hi.", barge_in=False, flow=ScriptedFlow(start="menu", nodes={
    "menu": FlowNode(say="Press nine to leave.", dtmf={"9": "bye"}, timeout_secs=60),
    "bye": FlowNode(say="Bye.", hangup=True),
}))


def runner_command() -> list[str]:
    exe = Path(sys.executable).parent / "voicebus-agent-runner"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("voicebus-agent-runner")
    return [found] if found else [sys.executable, "-m", "voicebus.agent_runner.main"]


async def test_process_serves_health_takes_a_call_and_drains_on_sigterm(
        nats_url: str, subject_prefix: str, nc: NATS, call_control: FakeCallControl, tmp_path: Path,
        jetstream_cleanup: None) -> None:
    port = free_port()
    env = {**os.environ, "NATS_URL": nats_url, "VOICEBUS_SUBJECT_PREFIX": subject_prefix,
           "VOICEBUS_RUNNER_PORT": str(port), "VOICEBUS_RUNNER_CAPACITY": "1", "VOICEBUS_INSTANCE_ID": "proc-runner",
           "VOICEBUS_RUNNER_DRAIN_TIMEOUT_S": "30", "LOG_LEVEL": "WARNING"}
    log_path = tmp_path / "runner.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(*runner_command(), env=env, stdout=log_file, stderr=log_file)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            async def ready() -> bool:
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            deadline = asyncio.get_running_loop().time() + 60
            while not await ready():
                assert proc.returncode is None, "runner exited during start-up"
                assert asyncio.get_running_loop().time() < deadline, "runner never became ready"
                await asyncio.sleep(0.1)
            info = (await http.get("/readyz")).json()
            assert (info["runner_id"], info["capacity"], info["active_calls"]) == ("proc-runner", 1, 0)

            ing = FakeIngress(nc, Subjects(prefix=subject_prefix))
            accepted = await ing.offer(FLOW)
            assert accepted.runner_id == "proc-runner"
            await ing.wait_frames(5)

            proc.send_signal(signal.SIGTERM)
            # Draining: no longer ready, the call goes on, the process waits for it.
            for _ in range(50):
                try:
                    r = await http.get("/readyz")
                except httpx.TransportError as e:
                    raise AssertionError(f"health endpoint gone while draining ({e!r}); exit "
                                         f"{proc.returncode}; log:\n{log_path.read_text()[-3000:]}") from e
                if r.status_code == 503:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 503 and r.json()["checks"]["accepting"] is False
            assert proc.returncode is None
            await ing.dtmf("9")
            req = await call_control.wait_hangup(ing.call_id)
            assert req.reason == "agent_hangup"
        code = await asyncio.wait_for(proc.wait(), 20)
        assert code == 0, log_path.read_text()[-2000:]
        await ing.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
