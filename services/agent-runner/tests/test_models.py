"""Where voices come from: the bundled joe voice, a provisioned directory, or a clear refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from voicebus.agent_runner.models import DEFAULT_VOICE, SharedModels, VoiceNotAvailable


def test_bundled_voice_files_exist() -> None:
    model, config = SharedModels()._voice_files(DEFAULT_VOICE)
    assert model.is_file() and config.is_file() and model.stat().st_size > 1_000_000


def test_provisioned_voice_directory(tmp_path: Path) -> None:
    (tmp_path / "en_GB-test-low.onnx").write_bytes(b"x")
    (tmp_path / "en_GB-test-low.onnx.json").write_text("{}")
    models = SharedModels(voices_dir=tmp_path)
    assert models._voice_files("en_GB-test-low") == (tmp_path / "en_GB-test-low.onnx",
                                                     tmp_path / "en_GB-test-low.onnx.json")
    with pytest.raises(VoiceNotAvailable, match="VOICEBUS_PIPER_VOICES_DIR"):
        models._voice_files("de_DE-missing-medium")
    with pytest.raises(VoiceNotAvailable):
        models._voice_files("../en_GB-test-low")  # no path tricks out of the directory


async def test_shared_models_load_once(models: SharedModels) -> None:
    assert models.piper_voice() is models.piper_voice(DEFAULT_VOICE)
    assert models.silero_session() is models.silero_session()
