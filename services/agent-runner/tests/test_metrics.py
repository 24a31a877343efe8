"""``/metrics`` on a running runner: the load autoscaling reads follows real calls, and drain shows.

The exposition is parsed with prometheus_client's own text parser, the format Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from voicebus.agent_runner import metrics as m
from voicebus.bus.agent import AgentDefinition, FlowNode, ScriptedFlow
from voicebus.bus.subjects import Subjects
from voicebus.cli.embedded import free_port

from .conftest import FakeCallControl, FakeIngress, IngressFactory, RunnerFactory
from .test_main import runner_command

# Greets, then waits: the call ends only when the test hangs up.
WAITER = AgentDefinition(greeting="Hello.", barge_in=False, flow=ScriptedFlow(
    start="wait", nodes={"wait": FlowNode(say="", timeout_secs=60)}))

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def load(samples: Samples) -> tuple[float, float, float, float]:
    return tuple(samples[(name, ())] for name in (m.ACTIVE_CALLS, m.CAPACITY, m.FREE_SLOTS, m.DRAINING))  # type: ignore[return-value]


async def scrape(http: httpx.AsyncClient) -> Samples:
    r = await http.get(m.METRICS_PATH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers["content-type"]
    return parse(r.text)


async def scrape_until(http: httpx.AsyncClient, ok: Callable[[Samples], bool], what: str,
                       timeout: float = 10.0, alive: Callable[[], Awaitable[None]] | None = None) -> Samples:
    """Scrape like Prometheus does, until the runner reports ``what`` (a call's teardown is asynchronous)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(http)
        if ok(samples):
            return samples
        if alive is not None:
            await alive()
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}: {load(samples)}"
        await asyncio.sleep(0.05)


async def test_process_metrics_follow_a_call_up_and_down(
        nats_url: str, subject_prefix: str, nc: NATS, call_control: FakeCallControl, tmp_path: Path,
        jetstream_cleanup: None) -> None:
    port = free_port()
    env = {**os.environ, "NATS_URL": nats_url, "VOICEBUS_SUBJECT_PREFIX": subject_prefix,
           "VOICEBUS_RUNNER_PORT": str(port), "VOICEBUS_RUNNER_CAPACITY": "3",
           "VOICEBUS_INSTANCE_ID": "metrics-runner", "VOICEBUS_RUNNER_DRAIN_TIMEOUT_S": "5", "LOG_LEVEL": "WARNING"}
    log_path = tmp_path / "runner.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(*runner_command(), env=env, stdout=log_file, stderr=log_file)

    async def alive() -> None:
        assert proc.returncode is None, f"runner exited: {log_path.read_text()[-2000:]}"

    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            deadline = asyncio.get_running_loop().time() + 60
            while True:  # /metrics answers as soon as the HTTP server is up; wait for the runner itself
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await alive()
                assert asyncio.get_running_loop().time() < deadline, "runner never became ready"
                await asyncio.sleep(0.1)

            idle = await scrape(http)
            assert load(idle) == (0, 3, 3, 0)
            assert idle[(m.INFO, (("runner_id", "metrics-runner"),))] == 1
            assert idle[(f"{m.CALLS_ACCEPTED}_total", (("resume", "false"),))] == 0
            assert not any(name == f"{m.CALLS_ENDED}_total" for name, _ in idle)
            assert idle[("process_resident_memory_bytes", ())] > 0

            ing = FakeIngress(nc, Subjects(prefix=subject_prefix))
            assert (await ing.offer(WAITER)).runner_id == "metrics-runner"
            busy = await scrape(http)  # the slot is taken before the offer is answered
            assert load(busy) == (1, 3, 2, 0)
            assert busy[(f"{m.CALLS_ACCEPTED}_total", (("resume", "false"),))] == 1

            await ing.wait_frames(5)
            await ing.caller_hangup()
            # The slot is freed when the pipeline stops; the ended counter moves when the session is
            # forgotten, a moment later: wait for both.
            done = await scrape_until(
                http, lambda s: load(s)[0] == 0 and any(n == f"{m.CALLS_ENDED}_total" for n, _ in s),
                "the call to release its slot and be counted as ended", alive=alive)
            assert load(done) == (0, 3, 3, 0)
            ended = {labels: v for (name, labels), v in done.items() if name == f"{m.CALLS_ENDED}_total"}
            assert ended == {(("reason", "caller_hangup"), ("state", "completed")): 1}
            await ing.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0, log_path.read_text()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_draining_runner_reports_no_free_slot_while_its_call_goes_on(
        make_runner: RunnerFactory, ingress: IngressFactory, call_control: FakeCallControl) -> None:
    runner = await make_runner(capacity=2)
    transport = httpx.ASGITransport(app=runner.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://runner") as http:
        ing: FakeIngress = ingress()
        await ing.offer(WAITER)
        assert load(await scrape(http)) == (1, 2, 1, 0)

        stopping = asyncio.create_task(runner.stop(drain_timeout_s=30))
        draining = await scrape_until(http, lambda s: load(s)[3] == 1, "the runner to report draining")
        # Still running its call, but offering nothing: autoscaling must not count it as free capacity.
        assert load(draining) == (1, 2, 0, 1)

        await ing.caller_hangup()
        await asyncio.wait_for(stopping, 15)
        assert load(await scrape(http)) == (0, 2, 0, 1)


async def test_metrics_negotiate_openmetrics_for_scrapers_that_ask(make_runner: RunnerFactory) -> None:
    runner = await make_runner(capacity=2)
    transport = httpx.ASGITransport(app=runner.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://runner") as http:
        r = await http.get(m.METRICS_PATH, headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")
    assert f"{m.CAPACITY} 2" in r.text
