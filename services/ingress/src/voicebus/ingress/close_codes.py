"""Every WebSocket close code ingress sends, and the one exception that carries a refusal to the socket.

Close codes belong to ingress (docs/agent-stream.md and docs/ingress.md list them): providers only say
*why* they refuse (``StreamRefused.kind``) and :func:`from_stream_refusal` picks the code, so the
refusal vocabulary of every socket can be read, and tested, in one place.
"""

from __future__ import annotations

from voicebus.telephony.stream import StreamRefused

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # routing failure: missing/unknown provider, agent not found, quota exceeded
CLOSE_INTERNAL = 1011  # server failure, or a provider without Agent Stream support
CLOSE_RESTARTING = 1012  # this ingress replica is draining; the carrier may retry elsewhere
CLOSE_TRY_AGAIN = 1013  # no agent runner accepted the call in time
CLOSE_HANDSHAKE = 4400  # provider handshake error
CLOSE_UNAUTHORIZED = 4401  # per-call media socket: bad signature, missing/used/expired token
CLOSE_UNKNOWN_CALL = 4404  # per-call media socket: no call is waiting for this socket
CLOSE_HANDSHAKE_TIMEOUT = 4408  # the carrier's opening messages did not arrive in time

MAX_CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes, 2 are the code
INTERNAL_ERROR_REASON = "Internal server error"


def fit_close_reason(reason: str) -> str:
    """Cut ``reason`` to what a close frame can carry, on a UTF-8 character boundary.

    A reason longer than 123 bytes makes the WebSocket library raise while closing, which would turn a
    precise refusal into a dropped connection; truncating here keeps every refusal a proper close frame.
    """
    data = reason.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return data[:MAX_CLOSE_REASON_BYTES].decode("utf-8", errors="ignore")


class Refusal(Exception):
    """The socket must be closed with this code and reason (already fitted to a close frame)."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = fit_close_reason(reason)
        super().__init__(f"{code} {self.reason}")


def from_stream_refusal(e: StreamRefused, *, per_call_socket: bool = False) -> Refusal:
    """A provider's refusal as a close frame. On Agent Stream an unauthorized opening is a handshake
    error (4400, as the seed's contract has it); on a per-call socket it is 4401."""
    if e.kind == "timeout":
        return Refusal(CLOSE_HANDSHAKE_TIMEOUT, e.reason)
    if e.kind == "internal":
        return Refusal(CLOSE_INTERNAL, e.reason)
    if e.kind == "unauthorized" and per_call_socket:
        return Refusal(CLOSE_UNAUTHORIZED, e.reason)
    return Refusal(CLOSE_HANDSHAKE, e.reason)
