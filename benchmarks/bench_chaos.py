"""Chaos benchmark: concurrent demo calls on the embedded stack while a process or server is killed.

Not a CI test: it prints what happened to every call and exits non-zero when an invariant is broken.
For each fault kind (and each ``--rounds``) it places ``--calls`` concurrent demo calls (greeting,
press 1, opening hours, goodbye, the agent hangs up) against ``--runners`` agent-runners, injects the
fault at a random moment during the calls, restarts what it killed, waits for the calls to end, then
checks, through the same surfaces an operator has (the admin API, the Cloudonix stand-in's ``/_sim``
view):

- how each call ended (run ``state``/``end_reason`` and the caller's close code), and whether the two agree;
- calls resumed on another runner and their silence gaps (``logs.runner_attempts[].gap_ms``);
- runs still non-terminal, quota slots still held (``GET /api/v1/quota``) and carrier legs still up
  (``/_sim/sessions/{session}``) once a deadline after the calls has passed: the invariants;
- events lost as the caller can tell: a key press the agent never answered, a run with no record;
- quota undercount while the calls were up (live calls minus ``in_use``, sampled every 0.5 s).

Faults: ``runner-kill`` (SIGKILL the runner holding most calls, restart it), ``runner-term`` (SIGTERM:
drain, then restart), ``call-control-kill`` / ``config-kill`` (SIGKILL, restart after ``--down-s``),
``nats-restart`` (kill NATS, same port and store after ``--nats-down-s``), ``valkey-restart`` (kill,
empty Valkey on the same port after ``--valkey-down-s``), ``ingress-kill`` (SIGKILL, restart), and
``none`` (a baseline, not in the default list).

The benchmark starts its own embedded NATS and Valkey (it has to kill them) and uses SQLite; every
address is loopback. Run:

    .venv/bin/python benchmarks/bench_chaos.py --calls 8 --rounds 1 [--faults runner-kill nats-restart]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from voicebus.cli.demo import DEMO_DOMAIN, Tenant, setup_tenant
from voicebus.cli.embedded import EmbeddedNats, EmbeddedValkey
from voicebus.cli.stack import ServiceProcess, Stack, StackConfig
from voicebus.simulator.call import CallerAction, CallReport, CallScript, TimelineEvent, place_call
from voicebus.simulator.cloudonix_api import run_cloudonix_api

FAULTS = ("runner-kill", "runner-term", "call-control-kill", "config-kill", "nats-restart", "valkey-restart",
          "ingress-kill")
TERMINAL = {"completed", "failed"}
DTMF_ANSWER_S = 5.0  # the menu's answer to "1" starts well within this; later audio is the 8 s timeout's goodbye
POLL_S = 0.5  # polling period of other processes' APIs


# ---------------------------------------------------------------------------------------------- servers
class Servers:
    """The benchmark's own NATS (JetStream, on disk) and Valkey (memory), so it may kill and restart them."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.nats = EmbeddedNats(store_dir=home / "nats", log_file=home / "nats.log").start()
        self.valkey = EmbeddedValkey(log_file=home / "valkey.log").start()

    def kill_nats(self) -> None:
        _kill(self.nats)

    def start_nats(self) -> None:
        self.nats = EmbeddedNats(port=self.nats.port, store_dir=self.nats.store_dir,
                                 log_file=self.home / "nats.log").start()

    def kill_valkey(self) -> None:
        _kill(self.valkey)

    def start_valkey(self) -> None:
        self.valkey = EmbeddedValkey(port=self.valkey.port, log_file=self.home / "valkey.log").start()

    def ensure_up(self) -> None:
        if self.nats.proc is None or self.nats.proc.poll() is not None:
            self.start_nats()
        if self.valkey.proc is None or self.valkey.proc.poll() is not None:
            self.start_valkey()

    def stop(self) -> None:
        self.nats.stop()
        self.valkey.stop()


def _kill(server: EmbeddedNats | EmbeddedValkey) -> None:
    if server.proc is not None and server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(5)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Fault:
    kind: str
    at_s: float = 0.0
    victim: str = ""
    calls_on_victim: int = 0
    down_s: float = 0.0
    note: str = ""


@dataclass
class CallOutcome:
    call_id: str
    session: str
    error: str | None
    close: str
    hung_up_by: str | None
    run_state: str | None = None
    end_reason: str | None = None
    attempts: int = 0
    gaps_ms: list[int] = field(default_factory=list)
    dtmf_sent: bool = False
    dtmf_answered: bool = False
    dtmf_early: bool = False
    timeline: list[str] = field(default_factory=list)
    leg_state: str = "?"
    leg_ended_by: str | None = None
    leg_deletes: int = 0

    @property
    def connected(self) -> bool:
        return self.error is None

    @property
    def completed(self) -> bool:
        return (self.run_state == "completed" and self.end_reason == "agent_hangup" and self.close == "1000"
                and self.hung_up_by == "agent")

    @property
    def reason_true(self) -> bool:
        """The run's account agrees with what the caller saw (an agent hangup is a normal close, and back)."""
        if self.run_state is None or not self.connected:
            return True
        normal_close = self.close == "1000" and self.hung_up_by == "agent"
        return (self.end_reason == "agent_hangup") == normal_close


@dataclass
class Batch:
    fault: Fault
    calls: list[CallOutcome]
    non_terminal: int
    no_run: int
    slots_held: int
    slots_free_after_s: float | None
    quota_undercount: int
    legs_up: int
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "calls": [asdict(c) for c in self.calls]}


# ---------------------------------------------------------------------------------------------- helpers
def pct(values: list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return float(s[max(0, math.ceil(q / 100 * len(s)) - 1)])


async def poll_until(probe: Callable[[], Awaitable[bool]], deadline: float) -> bool:
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if await probe():
                return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)


async def runs_by_call(admin: httpx.AsyncClient, agent_uuid: str) -> dict[str, dict[str, Any]]:
    resp = await admin.get("/api/v1/runs", params={"agent_uuid": agent_uuid, "limit": 500})
    resp.raise_for_status()
    return {(r.get("gathered_context") or {}).get("call_id", ""): r for r in resp.json()}


def runner_of(run: dict[str, Any]) -> str | None:
    logs = run.get("logs") or {}
    attempts = logs.get("runner_attempts") or []
    if attempts:
        return str(attempts[-1].get("runner_id"))
    return (logs.get("runner") or {}).get("runner_id")


def dtmf_answered(report: CallReport) -> tuple[bool, bool, bool]:
    """(sent, answered, early): answered = the agent started speaking within DTMF_ANSWER_S of the key press;
    early = pressed before the menu began (fewer than two agent utterances before it: the caller's silence
    rule fired in the pause between greeting and menu, which slow synthesis under load stretches), so an
    unanswered early press is the script's timing, not a lost event."""
    sent = report.first("dtmf_sent")
    if sent is None:
        return False, False, False
    speaking = [e.t_ms for e in report.events if e.kind == "agent_speaking"]
    after = [t for t in speaking if t > sent.t_ms]
    early = len(speaking) - len(after) < 2
    return True, bool(after) and after[0] - sent.t_ms <= DTMF_ANSWER_S * 1000, early


# ---------------------------------------------------------------------------------------------- the run
class Chaos:
    def __init__(self, args: argparse.Namespace, stack: Stack, servers: Servers, cloudonix_url: str, token: str,
                 log: TextIO) -> None:
        self.a = args
        self.stack = stack
        self.servers = servers
        self.cloudonix_url = cloudonix_url
        self.token = token
        self.log = log
        self.rng = random.Random(args.seed)

    def say(self, msg: str) -> None:
        print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    async def restart(self, name: str) -> None:
        svc = self.stack.services[name]
        await asyncio.to_thread(svc.start, self.log, False)
        await asyncio.to_thread(self.stack.wait_healthy, 120.0, [name])

    async def ensure_up(self) -> None:
        """Before a batch: every server and service up (a restart may have failed in the previous one)."""
        await asyncio.to_thread(self.servers.ensure_up)
        for name, svc in self.stack.services.items():
            if not svc.alive:
                self.say(f"{name} was down before the batch: restarting it")
                await self.restart(name)

    async def inject(self, fault: Fault, admin: httpx.AsyncClient, tenant: Tenant) -> None:
        a = self.a
        kind = fault.kind
        t0 = time.monotonic()

        async def down_then(kill: Callable[[], None], start: Callable[[], Awaitable[None]], down: float) -> None:
            await asyncio.to_thread(kill)
            await asyncio.sleep(down)  # the outage being simulated
            await start()
            fault.down_s = round(time.monotonic() - t0, 1)

        def kill_svc(name: str) -> Callable[[], None]:
            def k() -> None:
                svc: ServiceProcess = self.stack.services[name]
                svc.signal(signal.SIGKILL)
                svc.wait(5)
            return k

        if kind.startswith("runner-"):
            runs = await runs_by_call(admin, tenant.agent_uuid)
            held = Counter(runner_of(r) for r in runs.values() if r["state"] not in TERMINAL)
            runners = [n for n in self.stack.services if n.startswith("runner-")]
            victim = max(runners, key=lambda n: (held.get(n, 0), self.rng.random()))
            fault.victim, fault.calls_on_victim = victim, held.get(victim, 0)
            if kind == "runner-kill":
                await down_then(kill_svc(victim), lambda: self.restart(victim), a.runner_down_s)
            else:
                svc = self.stack.services[victim]
                svc.signal(signal.SIGTERM)
                code = await asyncio.to_thread(svc.wait, a.drain_bound_s)
                if code is None:
                    fault.note = f"still draining after {a.drain_bound_s:.0f}s: SIGKILLed"
                    await asyncio.to_thread(kill_svc(victim))
                else:
                    fault.note = f"exited {code} after {time.monotonic() - t0:.1f}s"
                await self.restart(victim)
                fault.down_s = round(time.monotonic() - t0, 1)
        elif kind in ("call-control-kill", "config-kill", "ingress-kill"):
            name = kind.removesuffix("-kill")
            fault.victim = name
            down = a.ingress_down_s if name == "ingress" else a.down_s
            await down_then(kill_svc(name), lambda: self.restart(name), down)
        elif kind == "nats-restart":
            fault.victim = "nats"
            await down_then(self.servers.kill_nats, lambda: asyncio.to_thread(self.servers.start_nats), a.nats_down_s)
        elif kind == "valkey-restart":
            fault.victim = "valkey"
            await down_then(self.servers.kill_valkey, lambda: asyncio.to_thread(self.servers.start_valkey),
                            a.valkey_down_s)

    async def batch(self, kind: str, round_no: int) -> Batch:
        a = self.a
        await self.ensure_up()
        tenant = await setup_tenant(self.stack, self.stack.config_url, self.token, concurrent_calls=1000)
        url = tenant.stream_url(self.stack, "CALLID").replace("CALLID", "{call_id}")
        headers = {"Authorization": f"Bearer {tenant.api_key}"}
        fault = Fault(kind)
        live: set[str] = set()
        undercount = 0
        async with httpx.AsyncClient(base_url=self.stack.config_url, headers=headers, timeout=5,
                                     trust_env=False) as admin, \
                httpx.AsyncClient(base_url=self.cloudonix_url, timeout=10, trust_env=False) as cx:
            t_batch = time.monotonic()

            async def one(i: int) -> tuple[str, CallScript, CallReport | None, str | None]:
                call_id = f"chaos-{kind}-{round_no}-{i}-{secrets.token_hex(3)}"
                script = CallScript(domain=DEMO_DOMAIN, cloudonix_api=self.cloudonix_url,
                                    actions=[CallerAction.dtmf("1")], agent_silence_ms=a.agent_silence_ms,
                                    max_duration_s=a.max_call_s)

                def on_event(ev: TimelineEvent) -> None:
                    if ev.kind == "first_agent_audio":
                        live.add(call_id)
                    elif ev.kind == "closed":
                        live.discard(call_id)

                await asyncio.sleep(self.rng.uniform(0, a.spread_s))  # arrivals spread a little, as in life
                try:
                    report = await asyncio.wait_for(place_call(url.format(call_id=call_id), script,
                                                               on_event=on_event), a.max_call_s + 30)
                    return call_id, script, report, None
                except Exception as e:  # the benchmark records every way a call can go wrong
                    live.discard(call_id)
                    return call_id, script, None, f"{type(e).__name__}: {e}"

            async def sample_quota() -> None:
                nonlocal undercount
                while True:
                    await asyncio.sleep(POLL_S)
                    with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                        n_live = len(live)
                        in_use = int((await admin.get("/api/v1/quota")).json()["in_use"])
                        undercount = max(undercount, min(n_live, len(live)) - in_use)

            async def fault_task() -> None:
                if kind == "none":
                    return
                fault.at_s = round(self.rng.uniform(a.fault_min_s, a.fault_max_s), 1)
                await asyncio.sleep(fault.at_s)
                self.say(f"{kind} at {fault.at_s}s ({len(live)} calls live)")
                try:
                    await self.inject(fault, admin, tenant)
                except Exception as e:  # a failed restart is a finding, and the next batch retries
                    fault.note = f"{fault.note} injection/restart failed: {type(e).__name__}: {e}".strip()

            sampler = asyncio.create_task(sample_quota())
            injector = asyncio.create_task(fault_task())
            results = await asyncio.gather(*(one(i) for i in range(a.calls)))
            calls_done = time.monotonic()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            await injector
            self.say(f"{kind} round {round_no}: calls ended after {calls_done - t_batch:.0f}s; settling")

            outcomes: list[CallOutcome] = []
            for call_id, script, report, err in results:
                if report is None:
                    outcomes.append(CallOutcome(call_id, script.session, err, "-", None))
                    continue
                sent, answered, early = dtmf_answered(report)
                outcomes.append(CallOutcome(call_id, script.session, report.error,
                                            f"{report.close_code} {report.close_reason}".strip()
                                            if report.close_code != 1000 else "1000",
                                            report.hung_up_by, dtmf_sent=sent, dtmf_answered=answered,
                                            dtmf_early=early,
                                            timeline=[f"{e.t_ms} {e.kind}" for e in report.events
                                                      if e.kind not in ("mark_played", "mark_received")]))
            for o in outcomes:
                if not o.connected:  # the carrier ends a call whose media stream never connected
                    with contextlib.suppress(httpx.HTTPError):
                        await cx.post(f"/_sim/sessions/{o.session}/end")

            deadline = calls_done + a.settle_s
            runs: dict[str, dict[str, Any]] = {}
            ids = {o.call_id for o in outcomes}

            async def runs_terminal() -> bool:
                nonlocal runs
                runs = await runs_by_call(admin, tenant.agent_uuid)
                return all(runs[c]["state"] in TERMINAL for c in ids if c in runs)

            await poll_until(runs_terminal, deadline)
            in_use = -1
            freed_at: float | None = None

            async def quota_free() -> bool:
                nonlocal in_use, freed_at
                in_use = int((await admin.get("/api/v1/quota")).json()["in_use"])
                if in_use == 0 and freed_at is None:
                    freed_at = time.monotonic()
                return in_use == 0

            await poll_until(quota_free, deadline)
            legs: dict[str, dict[str, Any]] = {}

            async def legs_ended() -> bool:
                for o in outcomes:
                    if legs.get(o.session, {}).get("state") != "ended":
                        resp = await cx.get(f"/_sim/sessions/{o.session}")
                        if resp.status_code == 200:
                            legs[o.session] = resp.json()
                return all(legs.get(o.session, {}).get("state") == "ended" for o in outcomes)

            await poll_until(legs_ended, deadline)
            with contextlib.suppress(httpx.HTTPError):
                await runs_terminal()  # the final word on every run, after the deadline

        for o in outcomes:
            run = runs.get(o.call_id)
            if run is not None:
                o.run_state, o.end_reason = run["state"], run.get("end_reason")
                attempts = (run.get("logs") or {}).get("runner_attempts") or []
                o.attempts = len(attempts)
                o.gaps_ms = [int(x["gap_ms"]) for x in attempts[1:] if x.get("gap_ms") is not None]
            leg = legs.get(o.session, {})
            o.leg_state, o.leg_ended_by, o.leg_deletes = leg.get("state", "?"), leg.get("ended_by"), leg.get(
                "deletes", 0)
        connected = [o for o in outcomes if o.connected]
        return Batch(
            fault=fault, calls=outcomes,
            non_terminal=sum(1 for o in connected if o.run_state is not None and o.run_state not in TERMINAL),
            no_run=sum(1 for o in connected if o.run_state is None),
            slots_held=max(in_use, 0),
            slots_free_after_s=None if freed_at is None else round(max(0.0, freed_at - calls_done), 1),
            quota_undercount=max(undercount, 0),
            legs_up=sum(1 for o in outcomes if o.leg_state != "ended"),
            wall_s=round(time.monotonic() - t_batch, 1))


# ---------------------------------------------------------------------------------------------- report
def summarize(batches: list[Batch]) -> dict[str, Any]:
    calls = [c for b in batches for c in b.calls]
    gaps = [g for c in calls for g in c.gaps_ms]
    return {
        "batches": len(batches),
        "calls": len(calls),
        "connect_failed": sum(1 for c in calls if not c.connected),
        "completed": sum(1 for c in calls if c.completed),
        "resumed": sum(1 for c in calls if c.attempts >= 2),
        "gap_p50": pct(gaps, 50), "gap_p99": pct(gaps, 99), "gap_max": max(gaps) if gaps else float("nan"),
        "ended": Counter(f"{c.run_state}/{c.end_reason}" if c.run_state else "no run" for c in calls),
        "closes": Counter(c.close for c in calls),
        "non_terminal": sum(b.non_terminal for b in batches),
        "no_run": sum(b.no_run for b in batches),
        "slots_held": sum(b.slots_held for b in batches),
        "slots_free_after_s": max((b.slots_free_after_s or 0.0 for b in batches), default=0.0)
        if all(b.slots_free_after_s is not None for b in batches) else None,
        "undercount": max((b.quota_undercount for b in batches), default=0),
        "legs_up": sum(b.legs_up for b in batches),
        "dtmf_lost": sum(1 for c in calls if c.dtmf_sent and not c.dtmf_answered and not c.dtmf_early),
        "dtmf_early": sum(1 for c in calls if c.dtmf_sent and not c.dtmf_answered and c.dtmf_early),
        "no_dtmf": sum(1 for c in calls if c.connected and not c.dtmf_sent),
        "reason_false": sum(1 for c in calls if not c.reason_true),
    }


def fmt_ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0f}"


def print_report(batches: list[Batch], kinds: list[str]) -> bool:
    """Print the table; True when every invariant held."""
    head = (f"{'fault':<18} {'calls':>5} {'done':>5} {'resumed':>7} {'gap p50/p99/max ms':>19} {'non-term':>8} "
            f"{'slots':>5} {'freed s':>7} {'under':>5} {'legs up':>7} {'dtmf lost':>9} {'early':>5} {'no dtmf':>7} "
            f"{'reason ✗':>8} {'no run':>6}")
    print(head)
    print("-" * len(head))
    rows = [(k, [b for b in batches if b.fault.kind == k]) for k in kinds]
    rows.append(("TOTAL", batches))
    for name, bs in rows:
        if not bs:
            continue
        s = summarize(bs)
        gaps = f"{fmt_ms(s['gap_p50'])}/{fmt_ms(s['gap_p99'])}/{fmt_ms(s['gap_max'])}"
        freed = "-" if s["slots_free_after_s"] is None else f"{s['slots_free_after_s']:.1f}"
        print(f"{name:<18} {s['calls']:>5} {s['completed']:>5} {s['resumed']:>7} {gaps:>19} {s['non_terminal']:>8} "
              f"{s['slots_held']:>5} {freed:>7} {s['undercount']:>5} {s['legs_up']:>7} {s['dtmf_lost']:>9} "
              f"{s['dtmf_early']:>5} "
              f"{s['no_dtmf']:>7} {s['reason_false']:>8} {s['no_run']:>6}")
    print()
    print("how calls ended (run state/end_reason; caller close code), and the faults injected:")
    for name, bs in rows[:-1]:
        if not bs:
            continue
        s = summarize(bs)
        ended = ", ".join(f"{k}: {v}" for k, v in s["ended"].most_common())
        closes = ", ".join(f"{k!r}: {v}" for k, v in s["closes"].most_common())
        print(f"  {name}: runs {ended}; closes {closes}")
        for b in bs:
            f = b.fault
            legs = [f"{c.call_id.rsplit('-', 2)[-2]}({c.run_state}/{c.end_reason})" for c in b.calls
                    if c.leg_state != "ended"]
            print(f"    at {f.at_s}s victim {f.victim or '-'} ({f.calls_on_victim} calls on it), back after "
                  f"{f.down_s}s {f.note}".rstrip() + (f"; legs up: {' '.join(legs)}" if legs else ""))
    total = summarize(batches)
    ok = total["non_terminal"] == 0 and total["slots_held"] == 0 and total["legs_up"] == 0
    print()
    print("invariants: " + ("held" if ok else
                            f"BROKEN: {total['non_terminal']} runs non-terminal, {total['slots_held']} slots held, "
                            f"{total['legs_up']} carrier legs up after the deadline"))
    return ok


# ---------------------------------------------------------------------------------------------- main
async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=12, help="concurrent calls per batch (default 12)")
    ap.add_argument("--rounds", type=int, default=1, help="batches per fault kind (default 1)")
    ap.add_argument("--faults", nargs="+", choices=[*FAULTS, "none"], default=list(FAULTS))
    ap.add_argument("--runners", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=0, help="calls per runner (default: --calls, so one runner "
                    "can take every call of a dead one)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--spread-s", type=float, default=2.0, help="calls start within this many seconds")
    ap.add_argument("--fault-min-s", type=float, default=4.0, help="earliest fault, after the batch starts")
    ap.add_argument("--fault-max-s", type=float, default=10.0, help="latest fault")
    ap.add_argument("--down-s", type=float, default=5.0, help="call-control / config outage")
    ap.add_argument("--nats-down-s", type=float, default=3.0)
    ap.add_argument("--valkey-down-s", type=float, default=3.0)
    ap.add_argument("--ingress-down-s", type=float, default=2.0)
    ap.add_argument("--runner-down-s", type=float, default=2.0, help="a SIGKILLed runner restarts after this")
    ap.add_argument("--drain-bound-s", type=float, default=90.0, help="SIGKILL a SIGTERMed runner after this")
    ap.add_argument("--agent-silence-ms", type=int, default=1500, help="the caller presses 1 after this much "
                    "agent silence (long enough that a resume gap is not taken for the end of the menu)")
    ap.add_argument("--max-call-s", type=float, default=60.0, help="the caller hangs up after this")
    ap.add_argument("--settle-s", type=float, default=60.0, help="deadline after the calls for runs to end, "
                    "slots to be freed and legs hung up (the lease TTL is 30 s)")
    ap.add_argument("--max-minutes", type=float, default=30.0, help="no batch starts after this")
    ap.add_argument("--json", type=Path, default=None, help="write every call's outcome here")
    args = ap.parse_args()
    if args.calls < 1 or args.rounds < 1 or args.runners < 2:
        ap.error("--calls and --rounds must be >= 1 and --runners >= 2 (a resume needs another runner)")
    if args.fault_min_s > args.fault_max_s:
        ap.error("--fault-min-s must not exceed --fault-max-s")
    started = time.monotonic()
    token = secrets.token_urlsafe(16)
    home = Path(tempfile.mkdtemp(prefix="vb-chaos-"))
    batches: list[Batch] = []
    skipped = 0
    async with run_cloudonix_api({DEMO_DOMAIN: token}) as cloudonix:
        with (home / "stack.log").open("w") as log:
            servers = await asyncio.to_thread(Servers, home)
            cfg = StackConfig.free_ports(runners=args.runners, home=home, nats_url=servers.nats.url,
                                         redis_url=servers.valkey.url,
                                         database_url=f"sqlite+aiosqlite:///{(home / 'voicebus.db').resolve()}",
                                         carrier_api_urls={"cloudonix": cloudonix.url},
                                         runner_capacity=args.capacity or args.calls)
            stack = Stack(cfg, out=log, color=False)
            chaos = Chaos(args, stack, servers, cloudonix.url, token, log)
            try:
                await asyncio.to_thread(stack.start_servers)
                chaos.say(f"starting the stack ({args.runners} runners; logs in {home / 'stack.log'})")
                await asyncio.to_thread(stack.start_services, 180.0)
                plan = [(k, r) for r in range(1, args.rounds + 1) for k in args.faults]
                for kind, round_no in plan:
                    if time.monotonic() - started > args.max_minutes * 60:
                        skipped += 1
                        continue
                    chaos.say(f"batch: {kind}, round {round_no}, {args.calls} calls")
                    batches.append(await chaos.batch(kind, round_no))
            finally:
                await asyncio.to_thread(stack.stop)
                await asyncio.to_thread(servers.stop)
    print(f"\n{args.calls} concurrent calls per batch, {args.runners} runners, seed {args.seed}, "
          f"{time.monotonic() - started:.0f}s in all" + (f", {skipped} batches skipped (time bound)" if skipped
                                                           else ""))
    print("done = run completed/agent_hangup and a normal agent close; gaps from logs.runner_attempts; "
          "slots = quota in_use at the deadline; freed s = seconds after the calls until in_use was 0; under = "
          "most live calls not counted by the quota; legs up = Cloudonix sessions still active at the deadline; "
          "dtmf lost = the press came after the menu began and no agent speech followed within 5 s (early = "
          "pressed before the menu, unanswered); "
          "reason ✗ = run end_reason disagrees with the caller's close\n")
    ok = print_report(batches, [*args.faults])
    if args.json:
        args.json.write_text(json.dumps([b.as_dict() for b in batches], indent=2, default=str))
    print(f"service logs: {home / 'stack.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
