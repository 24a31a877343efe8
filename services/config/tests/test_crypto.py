"""Key loading, encryption at rest, masking and the masked-value rule (unit level; the API tests
check the same rules end to end, including the raw database rows)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from voicebus.config.crypto import (
    TAG,
    MaskedValueError,
    SecretBox,
    SecretKeyError,
    SecretUnreadable,
    load_keys,
    mask,
    restore_masked,
)


@pytest.mark.parametrize(("value", "masked"), [
    ("sk-live-abcdefgh1234", "****1234"),
    ("123456789012", "****9012"),
    ("12345678", "****5678"),
    ("1234567", "****"),
    ("abc", "****"),
    ("", ""),
    (None, None),
])
def test_mask(value: str | None, masked: str | None) -> None:
    assert mask(value) == masked


def test_env_key_is_used_and_invalid_key_is_refused(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    assert load_keys(key.decode(), tmp_path / "unused.key") == [key]
    assert not (tmp_path / "unused.key").exists()
    with pytest.raises(SecretKeyError) as e:
        load_keys("not-a-fernet-key", tmp_path / "unused.key")
    assert "32-byte" in str(e.value)


def test_key_file_created_0600_reused_and_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "sub" / "secret.key"
    with caplog.at_level(logging.INFO, logger="voicebus.config.secrets"):
        keys = load_keys(None, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip().encode() == keys[0]
    assert any(str(path) in r.getMessage() for r in caplog.records)
    assert all(keys[0].decode() not in r.getMessage() for r in caplog.records)
    assert load_keys(None, path) == keys  # second start reads the same key


def test_corrupt_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.write_text("garbage\n")
    with pytest.raises(SecretKeyError) as e:
        load_keys(None, path)
    assert str(path) in str(e.value)


def test_encrypt_decrypt_and_rotation() -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    stored = SecretBox([old]).encrypt("tok-1234567890")
    assert stored.startswith(TAG) and "tok-1234567890" not in stored
    rotated = SecretBox([new, old])  # new key first: encrypts with new, still reads old
    assert rotated.decrypt(stored) == "tok-1234567890"
    with pytest.raises(SecretUnreadable):
        SecretBox([new]).decrypt(stored)


def test_paths_encrypt_nested_and_leave_the_rest() -> None:
    box = SecretBox.generate()
    data = {"llm": {"api_key": "sk-abcdefghijkl", "model": "m"}, "greeting": "hi"}
    enc = box.encrypt_paths(data, [("llm", "api_key"), ("absent", "x")])
    assert enc["llm"]["api_key"].startswith(TAG) and enc["llm"]["model"] == "m" and enc["greeting"] == "hi"
    assert data["llm"]["api_key"] == "sk-abcdefghijkl"  # input untouched
    assert box.decrypt_paths(enc, [("llm", "api_key")]) == data
    assert box.mask_paths(enc, [("llm", "api_key")])["llm"]["api_key"] == "****ijkl"
    assert SecretBox.generate().mask_paths(enc, [("llm", "api_key")])["llm"]["api_key"] == "****"  # wrong key


def test_restore_masked() -> None:
    stored = {"bearer_token": "tok-abcdefgh9876", "domain_id": "a.cloudonix.net"}
    paths = [("bearer_token",)]
    kept = restore_masked({"bearer_token": "****9876", "domain_id": "b"}, stored, paths)
    assert kept == {"bearer_token": "tok-abcdefgh9876", "domain_id": "b"}
    replaced = restore_masked({"bearer_token": "new-token-value"}, stored, paths)
    assert replaced["bearer_token"] == "new-token-value"
    with pytest.raises(MaskedValueError) as e:
        restore_masked({"bearer_token": "****0000"}, stored, paths)
    assert "bearer_token" in str(e.value)
    with pytest.raises(MaskedValueError):
        restore_masked({"bearer_token": "****9876"}, None, paths)  # nothing stored to keep
