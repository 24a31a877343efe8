"""Benchmark: the per-frame cost of voicebus's media path, on a real NATS server.

What it measures (prints a table; docs/benchmarks.md records the figures):
1. G.711 transcoding per 20 ms frame, both directions (what ingress does per frame).
2. One NATS hop for binary 20 ms frames with voicebus media headers, at real-time pace (50 fps per
   call) for N concurrent calls: publish -> subscriber latency p50/p99, and the CPU the process used.
   Publisher and subscriber share a process and a clock, so latency is one-way and exact.

Run: ``.venv/bin/python benchmarks/bench_media_path.py [--calls 1 50 200] [--seconds 5]``.
Uses NATS_URL, else 127.0.0.1:4222 if reachable, else an embedded nats-server.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
import uuid

import nats

from voicebus.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voicebus.bus import Subjects
from voicebus.bus.media import media_headers
from voicebus.cli.embedded import nats_for_benchmark

FRAME_PCM = bytes(range(256)) + bytes(64)  # 320 bytes: 20 ms of 8 kHz PCM16
FRAME_ULAW = pcm16_to_ulaw(FRAME_PCM)


def bench_codec(n: int = 50_000) -> tuple[float, float]:
    t = time.perf_counter()
    for _ in range(n):
        ulaw_to_pcm16(FRAME_ULAW)
    dec = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        pcm16_to_ulaw(FRAME_PCM)
    enc = (time.perf_counter() - t) / n * 1e6
    return dec, enc


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def bench_hop(url: str, calls: int, seconds: float) -> dict[str, float]:
    subjects = Subjects(prefix=f"bench{uuid.uuid4().hex[:6]}")
    pub = await nats.connect(url)
    sub = await nats.connect(url)
    latencies: list[float] = []
    sent_at: dict[tuple[int, int], float] = {}

    async def on_frame(msg: nats.aio.msg.Msg) -> None:
        call = int(msg.subject.split(".")[2][1:])
        key = (call, int(msg.headers["vb-seq"]))
        t0 = sent_at.pop(key, None)
        if t0 is not None:
            latencies.append(time.perf_counter() - t0)

    await sub.subscribe(f"{subjects.prefix}.call.*.media.in", cb=on_frame)
    await sub.flush()
    frames = int(seconds * 50)

    async def one_call(i: int) -> None:
        subject = subjects.media_in(f"c{i}")
        start = time.perf_counter() + (i % 50) * 0.0004  # spread calls across the 20 ms tick
        for seq in range(frames):
            delay = start + seq * 0.02 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # real-time pacing, as the carrier sends
            sent_at[(i, seq)] = time.perf_counter()
            await pub.publish(subject, FRAME_PCM, headers=media_headers(seq, seq * 20))

    cpu0 = _cpu()
    t0 = time.perf_counter()
    await asyncio.gather(*(one_call(i) for i in range(calls)))
    await pub.flush()
    await sub.flush()
    wall = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    await pub.close()
    await sub.close()
    latencies.sort()
    expected = calls * frames
    return {
        "calls": calls,
        "frames": expected,
        "received": len(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "max_ms": latencies[-1] * 1000,
        "cpu_pct": cpu / wall * 100,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 50, 200])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    dec, enc = bench_codec()
    print(f"G.711 per 20 ms frame: mu-law->PCM16 {dec:.2f} us, PCM16->mu-law {enc:.2f} us")
    url, server = nats_for_benchmark()
    try:
        print(f"NATS hop, 20 ms frames at real-time pace, {args.seconds:.0f} s per row ({url})")
        print(f"{'calls':>6} {'frames':>8} {'recv':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU %':>7}")
        for calls in args.calls:
            r = await bench_hop(url, calls, args.seconds)
            print(f"{r['calls']:>6.0f} {r['frames']:>8.0f} {r['received']:>8.0f} {r['p50_ms']:>8.2f} "
                  f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['cpu_pct']:>7.1f}")
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
