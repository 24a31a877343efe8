"""An offer is taken exactly once: which runner holds each call, in a JetStream KV bucket keyed by call id.

The offer subject is a queue group, so one request reaches one runner; but a request whose reply was lost
is retried and may land on another runner, and a resumed call is offered again on purpose. The claim
settles both: for one attempt only one runner can hold the call (``create`` fails for the second), and
a higher attempt (a resume after the holder died) takes the call over with a compare-and-set on the
claim's revision, so two runners resuming at once cannot both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import nats.errors
import nats.js.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

log = logging.getLogger("voicebus.agent_runner.claims")


class CallClaims:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def take(self, call_id: str, attempt: int, runner_id: str) -> str | None:
        """Claim the call for this attempt. None: this runner holds it; else the runner that does."""
        record = json.dumps({"runner_id": runner_id, "attempt": attempt}).encode()
        for _ in range(3):  # each lost race means someone else moved the claim; look again
            try:
                entry = await self.kv.get(call_id)
            except nats.js.errors.KeyNotFoundError:
                try:
                    await self.kv.create(call_id, record)
                    return None
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            held = _decode(entry.value)
            if held.get("runner_id") == runner_id and int(held.get("attempt", 0)) >= attempt:
                return None  # the same offer again (a retried request)
            if int(held.get("attempt", 0)) >= attempt:
                return str(held.get("runner_id") or "another runner")
            try:
                await self.kv.update(call_id, record, last=entry.revision)
                return None
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        return "another runner"

    async def taken_over(self, call_id: str, runner_id: str, done: asyncio.Event) -> bool:
        """Wait until another runner claims the call (True) or ``done`` is set (False).

        A runner that was cut off (its heartbeats stopped reaching ingress) may still be alive; once the
        call is resumed elsewhere it must stop talking, or the caller hears two agents.
        """
        watcher = await self.kv.watch(call_id)
        try:
            while not done.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                if entry is None or entry.operation in (KV_DEL, KV_PURGE):
                    continue
                holder = _decode(entry.value).get("runner_id")
                if holder and holder != runner_id:
                    log.warning("call %s: resumed on %s; this runner stops", call_id, holder)
                    return True
            return False
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def release(self, call_id: str, runner_id: str) -> None:
        """Drop the claim if it is still this runner's (a successor's claim is left alone)."""
        with contextlib.suppress(Exception):
            entry = await self.kv.get(call_id)
            if _decode(entry.value).get("runner_id") == runner_id:
                await self.kv.delete(call_id, last=entry.revision)


def _decode(value: bytes | None) -> dict[str, object]:
    try:
        data = json.loads(value or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
