"""A call's quota lease while its socket lives: renewed every ttl/3, released by the right party.

A crash stops renewal, so config's reaper ends the run and the slot comes back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from voicebus.bus.messages import QuotaLease
from voicebus.bus.rpc import BusError
from voicebus.ingress.bus import BusClient

log = logging.getLogger("voicebus.ingress.lease")


class LeaseKeeper:
    def __init__(self, bus: BusClient, lease: QuotaLease, call_id: str) -> None:
        self.bus = bus
        self.lease = lease
        self.call_id = call_id
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew(), name=f"renew-{self.call_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def release(self, *, leave_to_config: bool) -> None:
        """Release the slot, unless the terminal event is someone else's to publish.

        Config's reaper fails a running run whose lease is gone and trusts only events published before
        the lease went. When the agent hangs up, call-control publishes the terminal event after its
        carrier hangup, which can land after the socket is closed; releasing here would let the reaper
        call a completed call abandoned. So then the lease is left to config, which releases it when it
        applies that event (or lets it expire, and the run fail, if the event never comes).
        """
        await self.stop()
        if leave_to_config:
            log.info("call %s: quota lease left to config (ended by the agent)", self.call_id)
            return
        released = await self.bus.release_quota(self.lease.organization_id, self.lease.lease_id)
        log.info("call %s: quota lease released=%s", self.call_id, released)

    async def _renew(self) -> None:
        lease = self.lease
        while True:
            await asyncio.sleep(max(lease.ttl_s / 3, 0.05))  # a timer, not a synchronization
            try:
                lease = await self.bus.renew_quota(lease.organization_id, lease.lease_id)
            except BusError as e:
                if e.code in ("lease_expired", "not_found"):
                    log.error("call %s: quota lease %s expired; the call continues without its slot",
                              self.call_id, lease.lease_id)
                    return
                log.warning("call %s: quota lease renewal failed (%s); will retry", self.call_id, e)
