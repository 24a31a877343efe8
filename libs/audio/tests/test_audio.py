"""G.711 codecs and 20 ms framing."""

from __future__ import annotations

import array
import math

import pytest

from voicebus.audio import FrameCutter, alaw_to_pcm16, frame_bytes, pcm16_to_alaw, pcm16_to_ulaw, ulaw_to_pcm16


def _tone(ms: int = 100, rate: int = 8000, hz: float = 440.0, amp: int = 8000) -> bytes:
    n = rate * ms // 1000
    return array.array("h", (int(amp * math.sin(2 * math.pi * hz * i / rate)) for i in range(n))).tobytes()


@pytest.mark.parametrize(("encode", "decode"), [(pcm16_to_ulaw, ulaw_to_pcm16), (pcm16_to_alaw, alaw_to_pcm16)])
def test_g711_round_trip_is_close(encode, decode) -> None:  # type: ignore[no-untyped-def]
    pcm = _tone()
    coded = encode(pcm)
    assert len(coded) == len(pcm) // 2  # one byte per sample
    back = array.array("h", decode(coded))
    orig = array.array("h", pcm)
    worst = max(abs(a - b) for a, b in zip(orig, back, strict=True))
    assert worst < 8000 * 0.04, "G.711 error stays within a few percent of full scale at this level"


def test_odd_pcm_is_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        pcm16_to_ulaw(b"\x00\x01\x02")


def test_frame_cutter_makes_exact_frames_and_keeps_the_rest() -> None:
    size = frame_bytes(8000)
    assert size == 320
    cutter = FrameCutter(size)
    assert cutter.push(b"\x01" * 300) == []
    frames = cutter.push(b"\x02" * 700)
    assert [len(f) for f in frames] == [320, 320, 320]
    assert frames[0][:300] == b"\x01" * 300 and frames[0][300:] == b"\x02" * 20
    assert len(cutter) == 40
    tail = cutter.flush()
    assert tail is not None and len(tail) == 320 and tail[40:] == b"\x00" * 280
    assert cutter.flush() is None
    with pytest.raises(ValueError):
        FrameCutter(0)
