"""Binary media on the bus: raw PCM16LE payloads, sequence and timestamp in NATS headers.

Audio is never base64 JSON on the bus: a 20 ms 8 kHz frame is 320 bytes of payload and two short
headers, so ingress and runner do no parsing on the hot path beyond reading two integers.
"""

from __future__ import annotations

SEQ_HEADER = "vb-seq"
TS_HEADER = "vb-ts"  # milliseconds since the first frame of this direction of this call
# On media.out and event.out: the runner that sent it. After a call is resumed on another runner, ingress
# forwards only the current runner's output, so a runner that was cut off but is still alive cannot
# talk over its successor.
RUNNER_HEADER = "vb-runner"


def sender_headers(runner_id: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {**(headers or {}), RUNNER_HEADER: runner_id}


def media_headers(seq: int, ts_ms: int) -> dict[str, str]:
    return {SEQ_HEADER: str(seq), TS_HEADER: str(ts_ms)}


def read_media_headers(headers: dict[str, str] | None) -> tuple[int | None, int | None]:
    if not headers:
        return None, None
    try:
        seq = int(headers[SEQ_HEADER]) if SEQ_HEADER in headers else None
        ts = int(headers[TS_HEADER]) if TS_HEADER in headers else None
    except ValueError:
        return None, None
    return seq, ts
