"""call-control's settings: the carrier API URL map and the public URL, from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from voicebus.call_control.settings import CallControlSettings


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> CallControlSettings:
    for name in ("VOICEBUS_CARRIER_API_URLS", "VOICEBUS_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return CallControlSettings()


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch)
    assert s.carrier_api_urls == {} and s.public_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize("value", [
    "cloudonix=http://127.0.0.1:8090/, twilio=http://127.0.0.1:8091",
    '{"cloudonix": "http://127.0.0.1:8090/", "twilio": "http://127.0.0.1:8091"}',
])
def test_carrier_api_urls_as_list_or_json(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    s = settings(monkeypatch, VOICEBUS_CARRIER_API_URLS=value)
    assert s.carrier_api_urls == {"cloudonix": "http://127.0.0.1:8090", "twilio": "http://127.0.0.1:8091"}


@pytest.mark.parametrize(("value", "message"), [
    ("nonesuch=http://x", "unknown provider(s) in carrier API URLs: nonesuch"),
    ("cloudonix", "expected provider=url"),
    ('["cloudonix"]', "expected provider=url"),
    ('{"cloudonix": 1}', "must be an http(s) URL"),
    ("cloudonix=127.0.0.1:8090", "must be an http(s) URL"),
])
def test_bad_carrier_api_urls(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    with pytest.raises(ValidationError) as e:
        settings(monkeypatch, VOICEBUS_CARRIER_API_URLS=value)
    assert "VOICEBUS_CARRIER_API_URLS" in str(e.value) and message in str(e.value)


def test_public_url(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings(monkeypatch, VOICEBUS_PUBLIC_URL=" https://voice.example.com/ ").public_url == (
        "https://voice.example.com")
    for bad in ("voice.example.com", "wss://voice.example.com", "https://voice.example.com/?t=1"):
        with pytest.raises(ValidationError, match="VOICEBUS_PUBLIC_URL must be an http"):
            settings(monkeypatch, VOICEBUS_PUBLIC_URL=bad)
