"""Benchmark: what it costs to check carrier signatures in call-control instead of in ingress.

Ingress never holds a carrier secret, so every carrier webhook and media-socket upgrade is checked by
a ``{prefix}.ctl.verify`` request: ingress -> NATS -> call-control -> (config for the credentials) ->
verifier -> replay claim in JetStream KV -> back. This script measures that round trip against the
same verification done in-process (what ingress would spend if it held the auth token).

- call-control runs as its real process (``voicebus-call-control``), as deployed;
- config is a stand-in ``cfg.telephony.credentials`` responder in this process (answering Twilio
  credentials at once, so the figure is the hop's cost, not a database's);
- requests are Twilio voice webhooks signed with the official ``twilio`` SDK's ``RequestValidator``;
  by default each carries a fresh ``I-Twilio-Idempotency-Token``, so every verify also claims a
  replay key (one JetStream KV write), as a real webhook does; ``--no-replay-key`` leaves it out.

Prints p50/p95/p99 per concurrency level and the ratio to in-process verification;
docs/benchmarks.md records the figures.

Run: ``.venv/bin/python benchmarks/bench_verify_hop.py [--requests 2000] [--concurrency 1 16]``.
Uses NATS_URL, else 127.0.0.1:4222 if reachable, else an embedded nats-server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import time
import uuid
from urllib.parse import urlencode

import httpx
import nats
from nats.aio.client import Client as NATS
from twilio.request_validator import RequestValidator

from voicebus.bus.messages import TelephonyCredentials, TelephonyCredentialsRequest, VerifyRequest, VerifyResult
from voicebus.bus.rpc import request, serve
from voicebus.bus.subjects import CFG_TELEPHONY_CREDENTIALS, CONFIG_QUEUE, CTL_VERIFY, Subjects
from voicebus.cli.embedded import free_port, nats_for_benchmark
from voicebus.telephony import get_spec
from voicebus.telephony.webhook import WebhookRequest

ACCOUNT_SID = "AC" + "5a" * 16
AUTH_TOKEN = "bench-auth-token-0f1e2d3c"
CONFIG_ID = 1
URL = "https://voice.example.com/api/v1/telephony/inbound/run"


def webhook(replay_key: bool) -> tuple[str, dict[str, str], bytes]:
    """A Twilio voice webhook as Twilio sends it (form body, SDK signature)."""
    params = {"AccountSid": ACCOUNT_SID, "ApiVersion": "2010-04-01", "CallSid": "CA" + uuid.uuid4().hex,
              "CallStatus": "ringing", "Called": "+14155550100", "Caller": "+14155559999", "Direction": "inbound",
              "From": "+14155559999", "To": "+14155550100", "FromCountry": "US", "ToCountry": "US"}
    headers = {"content-type": "application/x-www-form-urlencoded",
               "x-twilio-signature": RequestValidator(AUTH_TOKEN).compute_signature(URL, params)}
    if replay_key:
        headers["i-twilio-idempotency-token"] = str(uuid.uuid4())
    return URL, headers, urlencode(params).encode()


def percentiles(samples_ms: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return q[49], q[94], q[98]


def bench_in_process(requests: list[tuple[str, dict[str, str], bytes]]) -> list[float]:
    spec = get_spec("twilio")
    assert spec is not None and spec.verifier is not None
    creds = spec.credentials_model.model_validate({"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN})
    out = []
    for url, headers, body in requests:
        t = time.perf_counter()
        verdict = spec.verifier.verify(WebhookRequest("POST", url, headers, body), creds, now=time.time())
        out.append((time.perf_counter() - t) * 1000)
        assert verdict.ok, verdict.reason
    return out


async def bench_hop(nc: NATS, subjects: Subjects, requests: list[tuple[str, dict[str, str], bytes]],
                    concurrency: int) -> tuple[list[float], float]:
    out: list[float] = []
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            url, headers, body = queue.pop()
            req = VerifyRequest(telephony_config_id=CONFIG_ID, method="POST", url=url, headers=headers,
                                body_b64=base64.b64encode(body).decode())
            t = time.perf_counter()
            res = await request(nc, subjects.ctl(CTL_VERIFY), req, VerifyResult, timeout=10)
            out.append((time.perf_counter() - t) * 1000)
            assert res.valid and not res.replayed, res

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, len(out) / (time.perf_counter() - t0)


async def start_call_control(nats_url: str, subjects: Subjects) -> asyncio.subprocess.Process:
    port = free_port()
    env = {**os.environ, "NATS_URL": nats_url, "VOICEBUS_SUBJECT_PREFIX": subjects.prefix,
           "VOICEBUS_CALL_CONTROL_PORT": str(port), "LOG_LEVEL": "WARNING"}
    exe = os.path.join(os.path.dirname(sys.executable), "voicebus-call-control")
    proc = await asyncio.create_subprocess_exec(exe, env=env)
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(trust_env=False) as http:
        while True:  # wait for the condition "ready", bounded
            if proc.returncode is not None:
                raise RuntimeError("call-control exited during start-up")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("call-control never became ready")
            await asyncio.sleep(0.1)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--no-replay-key", action="store_true", help="webhooks without I-Twilio-Idempotency-Token")
    args = ap.parse_args()
    replay = not args.no_replay_key

    url, server = nats_for_benchmark()
    subjects = Subjects(prefix=f"bench{uuid.uuid4().hex[:8]}")
    nc = await nats.connect(url)

    async def credentials(_req: TelephonyCredentialsRequest) -> TelephonyCredentials:
        return TelephonyCredentials(telephony_config_id=CONFIG_ID, organization_id=1, provider="twilio",
                                    credentials={"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN})

    await serve(nc, subjects.cfg(CFG_TELEPHONY_CREDENTIALS), TelephonyCredentialsRequest, credentials,
                queue=CONFIG_QUEUE, concurrency=64)
    proc = await start_call_control(url, subjects)
    try:
        local = bench_in_process([webhook(replay) for _ in range(args.requests)])
        p50_local, p95_local, p99_local = percentiles(local)
        print(f"Twilio signature check, {args.requests} webhooks ({url}; replay key: {'yes' if replay else 'no'})")
        print(f"{'where':<28} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'p50 ratio':>10}")
        print(f"{'in-process':<28} {p50_local:>8.3f} {p95_local:>8.3f} {p99_local:>8.3f} "
              f"{1000 / statistics.fmean(local):>8.0f} {1.0:>10.0f}")
        await bench_hop(nc, subjects, [webhook(replay) for _ in range(args.warmup)], 4)
        for c in args.concurrency:
            samples, rate = await bench_hop(nc, subjects, [webhook(replay) for _ in range(args.requests)], c)
            p50, p95, p99 = percentiles(samples)
            print(f"{f'ctl.verify, {c} in flight':<28} {p50:>8.3f} {p95:>8.3f} {p99:>8.3f} {rate:>8.0f} "
                  f"{p50 / p50_local:>10.0f}")
    finally:
        proc.terminate()
        await proc.wait()
        js = nc.jetstream()
        await js.delete_stream(subjects.events_stream)
        for bucket in ("actions", "legs", "replay"):
            await js.delete_key_value(f"{subjects.prefix}_ctl_{bucket}")
        await nc.close()
        if server:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
