"""Benchmark: concurrent simulated calls through the whole stack (four services as processes).

Each call is the demo call (greeting, press 1, answer, goodbye, agent hangs up; ~13 s). For each
level of concurrency it prints the caller-side time to first agent audio (from ``start``), how many
calls completed, and the agent-runner's peak RSS and CPU. docs/benchmarks.md records the figures.

Run: ``.venv/bin/python benchmarks/bench_calls.py [--calls 1 4 8] [--capacity 8]``. Servers: NATS_URL,
REDIS_URL, DATABASE_URL if set, else embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from voicebus.cli.demo import DEMO_DOMAIN, setup_tenant
from voicebus.cli.stack import Stack, StackConfig
from voicebus.simulator.call import CallerAction, CallScript, place_call
from voicebus.simulator.cloudonix_api import run_cloudonix_api

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int) -> tuple[int, float]:
    """(RSS in MB, CPU seconds) of a process, from /proc."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return rss_kb // 1024, cpu


async def one_level(stack: Stack, tenant_url: str, cloudonix_url: str, calls: int, pid: int) -> None:
    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc_stats(pid)[0])
            await asyncio.sleep(0.1)  # sampling period

    _, cpu0 = proc_stats(pid)
    t0 = time.monotonic()
    sampler = asyncio.create_task(sample())
    scripts = [CallScript(domain=DEMO_DOMAIN, cloudonix_api=cloudonix_url, actions=[CallerAction.dtmf("1")],
                          max_duration_s=90) for _ in range(calls)]
    reports = await asyncio.gather(*(place_call(tenant_url.format(call_id=f"bench-{secrets.token_hex(4)}"), s)
                                     for s in scripts))
    wall = time.monotonic() - t0
    stop.set()
    await sampler
    rss_after, cpu1 = proc_stats(pid)
    firsts = sorted(r.first_agent_audio_ms for r in reports if r.first_agent_audio_ms is not None)
    done = sum(1 for r in reports if r.hung_up_by == "agent")
    p95 = firsts[max(0, int(len(firsts) * 0.95) - 1)] if firsts else float("nan")
    print(f"{calls:>6} {done:>6} {statistics.median(firsts) if firsts else float('nan'):>10.0f} {p95:>10.0f} "
          f"{peak:>9} {rss_after:>9} {(cpu1 - cpu0) / wall * 100:>9.0f}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--capacity", type=int, default=8)
    args = ap.parse_args()
    token = secrets.token_urlsafe(16)
    home = Path(tempfile.mkdtemp(prefix="vb-bench-"))
    async with run_cloudonix_api({DEMO_DOMAIN: token}) as cloudonix:
        with (home / "stack.log").open("w") as log:
            cfg = StackConfig.free_ports(home=home, carrier_api_urls={"cloudonix": cloudonix.url},
                                         runner_capacity=args.capacity, nats_url=os.environ.get("NATS_URL"),
                                         redis_url=os.environ.get("REDIS_URL"),
                                         database_url=os.environ.get("DATABASE_URL"))
            stack = Stack(cfg, out=log, color=False)
            try:
                await asyncio.to_thread(stack.start_servers)
                await asyncio.to_thread(stack.start_services)
                tenant = await setup_tenant(stack, stack.config_url, token, concurrent_calls=1000)
                url = tenant.stream_url(stack, "CALLID").replace("CALLID", "{call_id}")
                runner = stack.services["agent-runner"]
                assert runner.proc is not None
                rss0, _ = proc_stats(runner.proc.pid)
                print(f"agent-runner idle RSS after warm-up: {rss0} MB (capacity {args.capacity})")
                print(f"{'calls':>6} {'done':>6} {'1st p50 ms':>10} {'1st p95 ms':>10} {'peak MB':>9} "
                      f"{'after MB':>9} {'CPU %':>9}")
                for calls in args.calls:
                    await one_level(stack, url, cloudonix.url, calls, runner.proc.pid)
            finally:
                await asyncio.to_thread(stack.stop)
    print(f"service logs: {home / 'stack.log'}")


if __name__ == "__main__":
    asyncio.run(main())
