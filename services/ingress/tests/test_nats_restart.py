"""A NATS restart of a few seconds drops no call: while ingress's own connection is down it does not
take the runner's silence for a death, and once everyone is back the call goes on with the same runner.

Runs on its own NATS server (embedded, from the wheel), since the test kills and restarts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from voicebus.cli.embedded import EmbeddedNats
from voicebus.telephony.dialects.twilio_media_carrier import carrier_media

from .conftest import WAIT_S, Harness

STREAM = "MZ-stream-1"
OUTAGE_S = 3.0


@pytest.fixture
def restartable_nats(tmp_path: Path) -> Iterator[list[EmbeddedNats]]:
    servers = [EmbeddedNats(store_dir=tmp_path / "nats").start()]
    yield servers
    servers[-1].stop()


@pytest.fixture
def nats_url(restartable_nats: list[EmbeddedNats]) -> str:
    return restartable_nats[0].url


async def test_a_three_second_nats_restart_drops_no_call(harness: Harness,
                                                         restartable_nats: list[EmbeddedNats]) -> None:
    await harness.start_ingress(heartbeat_timeout_s=1.5)
    ws = await harness.dial()
    await harness.changes.wait(lambda: harness.runner.calls)
    assert harness.ingress is not None
    (live,) = harness.ingress.calls
    await asyncio.wait_for(live.answered.wait(), WAIT_S)
    call = harness.runner.only_call

    server = restartable_nats[0]
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(5)
    await asyncio.sleep(OUTAGE_S)  # the length of the outage under test, not a synchronization
    restartable_nats.append(EmbeddedNats(port=server.port, store_dir=server.store_dir).start())

    # Everyone reconnects; the caller's audio reaches the same runner again, and nothing ended.
    before = len(call.frames)
    for seq in range(50):
        await ws.send(carrier_media(STREAM, b"\xff" * 160, seq=100 + seq, timestamp_ms=2000 + seq * 20))
        if len(call.frames) > before:
            break
        await asyncio.sleep(0.02)  # a carrier's 20 ms pace
    await harness.changes.wait(lambda: len(call.frames) > before)
    beats = harness.runner.beats
    await harness.changes.wait(lambda: harness.runner.beats >= beats + 4)  # 2 s more of heartbeats: still alive
    assert harness.runner.offers_seen == 1  # never resumed: the runner was not taken for dead
    assert harness.callcontrol.hangups == [] and harness.events.terminal() == []
    await ws.close()
