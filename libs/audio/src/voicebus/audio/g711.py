"""G.711 μ-law / A-law <-> PCM16LE via ``audioop`` (stdlib to 3.12, ``audioop-lts`` from 3.13)."""

from __future__ import annotations

try:
    import audioop
except ImportError:  # pragma: no cover - Python >= 3.13 without audioop-lts
    raise

_WIDTH = 2


def ulaw_to_pcm16(data: bytes) -> bytes:
    return audioop.ulaw2lin(data, _WIDTH)


def pcm16_to_ulaw(data: bytes) -> bytes:
    if len(data) % 2:
        raise ValueError("PCM16 payload must have an even number of bytes")
    return audioop.lin2ulaw(data, _WIDTH)


def alaw_to_pcm16(data: bytes) -> bytes:
    return audioop.alaw2lin(data, _WIDTH)


def pcm16_to_alaw(data: bytes) -> bytes:
    if len(data) % 2:
        raise ValueError("PCM16 payload must have an even number of bytes")
    return audioop.lin2alaw(data, _WIDTH)
