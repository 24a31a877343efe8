"""The per-call media socket (``/api/v1/telephony/media/{call_id}``) that answer markup points at.

Order of checks, each with its own close code (docs/ingress.md): a call must be waiting for this
socket (4404); the upgrade must carry the carrier's signature when the carrier signs (4401); the
carrier's opening must be well formed (4400/4408); the token it echoes must be this call's, unused and
unexpired (4401). Until the token is claimed the socket may be anyone's, so a refusal touches neither
the run nor the lease; once claimed, the socket owns the call and every exit ends the run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket

from voicebus.bus.messages import QuotaLease, RunUpdate
from voicebus.bus.rpc import BusError
from voicebus.bus.subjects import check_token
from voicebus.ingress.bus import CallServices
from voicebus.ingress.close_codes import (
    CLOSE_INTERNAL,
    CLOSE_RESTARTING,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_CALL,
    INTERNAL_ERROR_REASON,
    Refusal,
    from_stream_refusal,
)
from voicebus.ingress.live_call import CallSetup, publish_end
from voicebus.ingress.live_call.lease import LeaseKeeper
from voicebus.ingress.pending import PendingCall, describe
from voicebus.ingress.socket_entry import SocketEntry
from voicebus.telephony import get_spec
from voicebus.telephony.stream import StreamContext, StreamRefused, StreamStart

if TYPE_CHECKING:
    from voicebus.ingress.service import IngressService

log = logging.getLogger("voicebus.ingress.media_socket")


class MediaSocketCall(SocketEntry):
    span_name = "media_socket.call"

    def __init__(self, service: IngressService, ws: WebSocket, call_id: str) -> None:
        super().__init__(service, ws)
        self.call_id = call_id

    async def serve(self) -> None:
        assert self.call_id is not None
        if self.svc.draining:
            raise Refusal(CLOSE_RESTARTING, "Service restarting")
        try:
            check_token(self.call_id, "call id")
        except ValueError as e:
            raise Refusal(CLOSE_UNKNOWN_CALL, describe("unknown")) from e
        pending = await self.svc.pending.get(self.call_id)
        if pending is None:
            raise Refusal(CLOSE_UNKNOWN_CALL, describe("unknown"))
        spec = get_spec(pending.provider)
        if spec is None or spec.stream is None or spec.stream.media_socket is None:
            log.error("call %s: provider %s has no media socket handshake", self.call_id, pending.provider)
            raise Refusal(CLOSE_INTERNAL, INTERNAL_ERROR_REASON)
        upgrade = self.socket.upgrade_request()
        if spec.verifier is not None:
            try:
                verdict = await self.bus.verify(pending.telephony_config_id, upgrade)
            except BusError as e:
                log.warning("call %s: ctl.verify failed: %s", self.call_id, e)
                raise Refusal(CLOSE_INTERNAL, INTERNAL_ERROR_REASON) from e
            if not verdict.valid:
                log.warning("call %s: media socket upgrade refused: %s", self.call_id, verdict.reason)
                raise Refusal(CLOSE_UNAUTHORIZED, f"Signature validation failed: {verdict.reason}")

        services = CallServices(self.bus, call_id=self.call_id, run_id=pending.run_id,
                                organization_id=pending.organization_id, upgrade=upgrade)
        ctx = StreamContext(params=self.socket.ws.query_params, upgrade=upgrade,
                            organization_id=pending.organization_id, services=services,
                            timeout_s=self.settings.handshake_timeout_s,
                            telephony_config_id=pending.telephony_config_id)
        try:
            start = await spec.stream.media_socket(self.socket.receive, ctx)
        except StreamRefused as e:
            raise from_stream_refusal(e, per_call_socket=True) from e
        claim, claimed = await self.svc.pending.claim(self.call_id, start.token)
        if claim != "ok" or claimed is None:
            log.warning("call %s: media socket token refused (%s)", self.call_id, claim)
            raise Refusal(CLOSE_UNAUTHORIZED, describe(claim))
        await self._take_over(claimed, start)

    async def _take_over(self, pending: PendingCall, start: StreamStart) -> None:
        """From here this socket is the call's: every exit ends the run and settles the lease."""
        lease = QuotaLease(lease_id=pending.lease_id, organization_id=pending.organization_id,
                           ttl_s=pending.lease_ttl_s, limit=0, in_use=0)
        keeper = LeaseKeeper(self.bus, lease, self.call_id)
        keeper.start()
        handed_over = False
        try:
            run = self.run = await self.bus.get_run(pending.run_id)
            if run is None:
                raise Refusal(CLOSE_UNKNOWN_CALL, describe("unknown"))
            try:
                agent = await self.bus.resolve_agent(pending.agent_uuid)
                run = await self.bus.update_run(RunUpdate(
                    run_id=run.id, state="running", telephony_configuration_id=pending.telephony_config_id,
                    gathered_context=start.gathered_context or None,
                    logs={"media_socket": start.log_fields} if start.log_fields else None))
            except Refusal as e:
                await publish_end(self.bus, self.call_id, run, "failed", e.reason, lease.lease_id)
                raise
            setup = CallSetup(call_id=self.call_id, run=run, agent=agent, provider=pending.provider, start=start,
                              caller_number=pending.caller_number or start.caller_number,
                              called_number=pending.called_number or start.called_number)
            live = self.go_live(setup, keeper)
            handed_over = True
            log.info("call %s run %s: media socket open (%s %s)", self.call_id, run.id, pending.provider,
                     pending.direction)
            await live.run_call()
        finally:
            if not handed_over:
                await keeper.release(leave_to_config=False)
