"""The Agent Stream endpoint (``/api/v1/agent-stream/{agent_uuid}?provider=...``), from accept to close.

Phases (docs/agent-stream.md has the sequence and every close code):

1. *Admission*: provider, agent, quota slot, run. A refusal before the run exists is just a close frame.
2. *Handshake*: the provider reads the carrier's opening (and, for Cloudonix, has call-control confirm
   the session, which records the call's leg). From here every exit ends the run with a reason.
3. *Live call* (:mod:`voicebus.ingress.live_call`): offer, media, ending.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket

from voicebus.bus.messages import LegRegister, QuotaLease, ResolvedAgent, RunCreate, RunUpdate
from voicebus.bus.rpc import BusError
from voicebus.ingress.admission import agent_stream_provider, new_call_id, param, resolve_agent, run_name
from voicebus.ingress.bus import CallServices
from voicebus.ingress.close_codes import (
    CLOSE_INTERNAL,
    CLOSE_RESTARTING,
    INTERNAL_ERROR_REASON,
    Refusal,
    from_stream_refusal,
)
from voicebus.ingress.live_call import CallSetup, publish_end
from voicebus.ingress.live_call.lease import LeaseKeeper
from voicebus.ingress.socket_entry import SocketEntry
from voicebus.telephony.stream import CarrierDisconnected, StreamContext, StreamHandshake, StreamRefused, StreamStart

if TYPE_CHECKING:
    from voicebus.ingress.service import IngressService

log = logging.getLogger("voicebus.ingress.agent_stream")


class AgentStreamCall(SocketEntry):
    span_name = "agent_stream.call"

    def __init__(self, service: IngressService, ws: WebSocket, agent_path: str) -> None:
        super().__init__(service, ws)
        self.agent_path = agent_path  # a credential: never logged
        self.params = ws.query_params
        self.provider = ""

    # ------------------------------------------------------------------ phase 1: admission
    async def serve(self) -> None:
        if self.svc.draining:
            await self.socket.close(CLOSE_RESTARTING, "Service restarting")
            return
        try:
            spec, handshake = agent_stream_provider(self.params)
            self.provider = spec.name
            agent = await resolve_agent(self.bus, self.agent_path)
            self.call_id = new_call_id()
            lease = await self.bus.acquire_quota(agent.organization_id, holder=self.call_id)
        except Refusal as e:
            log.info("agent stream refused before run creation: %s %s", e.code, e.reason)
            await self.socket.close(e.code, e.reason)
            return

        keeper = LeaseKeeper(self.bus, lease, self.call_id)
        keeper.start()
        handed_over = False
        try:
            try:
                self.run = await self.bus.create_run(self._run_create(agent, lease))
            except Refusal as e:
                await self.socket.close(e.code, e.reason)
                return
            log.info("call %s: run %s created (provider %s)", self.call_id, self.run.id, self.provider)
            setup = await self._handshake(handshake, agent, lease)
            if setup is None:
                return
            live = self.go_live(setup, keeper)
            handed_over = True
            await live.run_call()  # settles the lease
        finally:
            if not handed_over:
                await keeper.release(leave_to_config=False)

    # ------------------------------------------------------------------ phase 2: handshake
    async def _handshake(self, handshake: StreamHandshake, agent: ResolvedAgent,
                         lease: QuotaLease) -> CallSetup | None:
        assert self.run is not None and self.call_id is not None
        run = self.run
        services = CallServices(self.bus, call_id=self.call_id, run_id=run.id,
                                organization_id=agent.organization_id, upgrade=self.socket.upgrade_request())
        ctx = StreamContext(params=self.params, upgrade=services.upgrade, organization_id=agent.organization_id,
                            services=services, timeout_s=self.settings.handshake_timeout_s)
        try:
            try:
                start = await handshake(self.socket.receive, ctx)
                await self._register_leg(start, agent.organization_id)
                await self.bus.update_run(self._running_update(start))
            except StreamRefused as e:
                raise from_stream_refusal(e) from e
        except Refusal as e:
            log.info("call %s run %s: handshake refused: %s %s", self.call_id, run.id, e.code, e.reason)
            await publish_end(self.bus, self.call_id, run, "failed", e.reason, lease.lease_id)
            await self.socket.close(e.code, e.reason)
            return None
        except CarrierDisconnected:
            log.info("call %s run %s: carrier disconnected during the handshake", self.call_id, run.id)
            await publish_end(self.bus, self.call_id, run, "failed", "Carrier disconnected during handshake",
                              lease.lease_id)
            return None
        except Exception:
            log.exception("call %s run %s: unexpected failure during the handshake", self.call_id, run.id)
            await publish_end(self.bus, self.call_id, run, "failed", INTERNAL_ERROR_REASON, lease.lease_id)
            await self.socket.close(CLOSE_INTERNAL, INTERNAL_ERROR_REASON)
            return None
        return CallSetup(call_id=self.call_id, run=run, agent=agent, provider=self.provider, start=start,
                         caller_number=param(self.params, "from") or start.caller_number,
                         called_number=param(self.params, "to") or start.called_number)

    async def _register_leg(self, start: StreamStart, organization_id: int) -> None:
        """A handshake that did not have call-control confirm the call (Twilio signs its upgrade
        instead) still records the leg there, so a hangup by call id reaches the carrier."""
        assert self.run is not None and self.call_id is not None
        if start.confirmed or start.telephony_config_id is None or not start.carrier_call_ref:
            return
        try:
            await self.bus.register_leg(LegRegister(
                call_id=self.call_id, run_id=self.run.id, organization_id=organization_id,
                telephony_config_id=start.telephony_config_id, carrier_call_id=start.carrier_call_ref))
        except BusError as e:
            log.warning("call %s: ctl.leg_register failed: %s", self.call_id, e)
            raise Refusal(CLOSE_INTERNAL, INTERNAL_ERROR_REASON) from e

    # ------------------------------------------------------------------ run fields
    def _carrier_call_id(self) -> str | None:
        return param(self.params, "callId") or param(self.params, "CallSid")

    def _inbound_webhook(self) -> dict[str, Any]:
        fields = {
            "Domain": param(self.params, "Domain"),
            "provider": self.provider,
            "callId": param(self.params, "callId"),
            "CallSid": param(self.params, "CallSid"),
            "from": param(self.params, "from"),
            "to": param(self.params, "to"),
        }
        return {k: v for k, v in fields.items() if v is not None}

    def _run_create(self, agent: ResolvedAgent, lease: QuotaLease) -> RunCreate:
        initial = {
            "caller_number": param(self.params, "from"),
            "called_number": param(self.params, "to"),
            "provider": self.provider,
            "direction": "inbound",
        }
        carrier_call_id = self._carrier_call_id()
        return RunCreate(
            organization_id=agent.organization_id,
            agent_uuid=agent.agent_uuid,
            name=run_name("WR-AGS"),
            call_type="inbound",
            mode=self.provider,
            call_id=self.call_id,
            agent_version=agent.version,
            definition_source=agent.definition_source,
            initial_context={k: v for k, v in initial.items() if v is not None},
            gathered_context={"call_id": carrier_call_id} if carrier_call_id else {},
            logs={"inbound_webhook": self._inbound_webhook()},
            quota_lease_id=lease.lease_id,
        )

    def _running_update(self, start: StreamStart) -> RunUpdate:
        assert self.run is not None
        gathered = dict(start.gathered_context)
        if not self._carrier_call_id() and start.carrier_call_ref:
            gathered["call_id"] = start.carrier_call_ref
        initial: dict[str, Any] = {}
        if param(self.params, "from") is None and start.caller_number:
            initial["caller_number"] = start.caller_number
        if param(self.params, "to") is None and start.called_number:
            initial["called_number"] = start.called_number
        return RunUpdate(
            run_id=self.run.id,
            state="running",
            telephony_configuration_id=start.telephony_config_id,
            initial_context=initial or None,
            gathered_context=gathered,
            logs={"inbound_webhook": {**self._inbound_webhook(), **start.log_fields}},
        )
