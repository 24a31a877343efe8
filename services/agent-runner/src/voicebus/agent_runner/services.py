"""pipecat services built on the process-wide models instead of loading their own per call.

pipecat 1.14's ``PiperTTSService`` loads (or downloads) its voice in ``__init__`` and
``SileroVADAnalyzer`` opens its own ONNX session; both are per-call objects, so used as is every call
would pay the load and hold its own copy. These subclasses keep pipecat's behaviour and take the
already-loaded model instead.
"""

from __future__ import annotations

from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.tts_service import TTSService
from piper import PiperVoice

from voicebus.agent_runner.models import SharedModels


class SharedPiperTTSService(PiperTTSService):
    """``PiperTTSService`` over a voice loaded once per process (no download, no per-call load)."""

    def __init__(self, *, voice: PiperVoice, voice_id: str, **kwargs: object) -> None:
        # Same as PiperTTSService.__init__ minus the download/load, which is the whole point.
        TTSService.__init__(
            self,
            push_start_frame=True,
            push_stop_frames=True,
            settings=PiperTTSService.Settings(model=None, voice=voice_id, language=None),
            **kwargs,
        )
        self._voice = voice


class _SharedSessionSileroModel(SileroOnnxModel):
    """Silero's per-stream state over a shared ``InferenceSession``."""

    def __init__(self, session: object) -> None:  # no super(): that would load the model again
        self.session = session
        self.sample_rates = [8000, 16000]
        self.reset_states()


class SharedSileroVADAnalyzer(SileroVADAnalyzer):
    """Silero VAD whose recurrent state is per call but whose ONNX graph is loaded once."""

    def __init__(self, models: SharedModels, *, sample_rate: int | None = None,
                 params: VADParams | None = None) -> None:
        VADAnalyzer.__init__(self, sample_rate=sample_rate, params=params)
        self._model = _SharedSessionSileroModel(models.silero_session())
        self._windows_since_reset = 0
        self._low_confidence_windows = 0
