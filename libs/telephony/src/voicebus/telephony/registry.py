"""Provider registry: one :class:`ProviderSpec` per carrier, registered when its package is imported.

Everything about a carrier is found here: ingress, call-control, config and the simulator look a
provider up by name (or ask every provider whether a webhook is theirs) and never import a provider
package. A spec declares which capabilities its carrier has; a missing one is ``None``, and callers
answer with a specific "not supported" instead of failing on an import.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel

from voicebus.telephony.rest import RestAction, RestFactory
from voicebus.telephony.stream import StreamCapability
from voicebus.telephony.verify import SignatureVerifier
from voicebus.telephony.webhook import WebhookDialect

FieldType = Literal["text", "password", "textarea", "string-array", "number", "url"]


@dataclass(frozen=True)
class UIField:
    name: str
    label: str
    type: FieldType = "text"
    sensitive: bool = False
    required: bool = True
    description: str = ""


def _strip(value: str) -> str:
    return value.strip()


@dataclass(frozen=True)
class ProviderSpec:
    """What the rest of voicebus needs to know about a carrier.

    ``credentials_model`` validates what an admin submits; fields listed in ``ui_fields`` with
    ``sensitive=True`` are encrypted at rest and masked in every response. ``account_id_field`` names
    the credential that identifies the carrier account (Cloudonix: ``domain_id``, Twilio:
    ``account_sid``), used to route an incoming call to one stored configuration.

    Capabilities (None when the carrier has none): ``stream`` (media socket dialect and handshakes),
    ``webhook`` (inbound/status parsing and answer markup), ``verifier`` (signatures, call-control only),
    ``rest`` (a factory of REST clients, call-control only; ``rest_actions`` says which actions it
    implements), ``fake`` (the module holding the carrier's side, for the simulator and tests).
    """

    name: str
    display_name: str
    credentials_model: type[BaseModel]
    ui_fields: tuple[UIField, ...]
    account_id_field: str
    normalize_account_id: Callable[[str], str] = _strip
    docs_url: str = ""
    default_api_url: str = ""
    stream: StreamCapability | None = None
    webhook: WebhookDialect | None = None
    verifier: SignatureVerifier | None = None
    rest: RestFactory | None = None
    rest_actions: frozenset[RestAction] = frozenset()
    fake: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sensitive_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.ui_fields if f.sensitive)

    @property
    def supports_agent_stream(self) -> bool:
        return self.stream is not None and self.stream.agent_stream is not None

    @property
    def capabilities(self) -> tuple[str, ...]:
        caps = []
        if self.supports_agent_stream:
            caps.append("agent_stream")
        if self.stream is not None and self.stream.media_socket is not None:
            caps.append("media_socket")
        if self.webhook is not None:
            caps.append("webhook")
        if self.verifier is not None:
            caps.append("verify")
        caps.extend(f"rest.{a}" for a in sorted(self.rest_actions))
        if self.fake is not None:
            caps.append("fake")
        return tuple(caps)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "docs_url": self.docs_url,
            "supports_agent_stream": self.supports_agent_stream,
            "capabilities": list(self.capabilities),
            "account_id_field": self.account_id_field,
            "fields": [f.__dict__ for f in self.ui_fields],
        }


_REGISTRY: dict[str, ProviderSpec] = {}
_PROVIDER_PACKAGES = ("cloudonix", "twilio", "vonage", "plivo", "telnyx", "vobiz", "ari")
_loaded = False


def register(spec: ProviderSpec) -> ProviderSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"provider {spec.name!r} registered twice")
    if spec.rest_actions and spec.rest is None:
        raise ValueError(f"provider {spec.name!r} lists REST actions but has no REST client")
    _REGISTRY[spec.name] = spec
    return spec


def _load() -> None:
    global _loaded
    if not _loaded:
        for pkg in _PROVIDER_PACKAGES:
            importlib.import_module(f"voicebus.telephony.providers.{pkg}")
        _loaded = True


def get_spec(name: str) -> ProviderSpec | None:
    _load()
    return _REGISTRY.get(name)


def all_specs() -> list[ProviderSpec]:
    """Sorted by name, so detection order (and every listing) is stable."""
    _load()
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


def load_fake(name: str) -> ModuleType:
    """The carrier-side module of a provider (simulator and tests); LookupError if it has none."""
    spec = get_spec(name)
    if spec is None or spec.fake is None:
        raise LookupError(f"provider {name!r} has no carrier-side fake")
    return importlib.import_module(spec.fake)


# --------------------------------------------------------------------------- carrier API base URLs
def parse_api_urls(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``{"twilio": "http://127.0.0.1:9000", ...}`` from JSON or ``twilio=http://..,cloudonix=http://..``.

    Unknown provider names are refused (a typo would otherwise silently send real traffic to the
    carrier's production API).
    """
    if not text:
        return {}
    if isinstance(text, Mapping):
        raw = dict(text)
    else:
        stripped = text.strip()
        if stripped.startswith("{"):
            loaded = json.loads(stripped)
            if not isinstance(loaded, dict):
                raise ValueError("carrier API URLs must be a JSON object of provider name to URL")
            raw = loaded
        else:
            raw = {}
            for part in filter(None, (p.strip() for p in stripped.split(","))):
                name, sep, url = part.partition("=")
                if not sep or not url.strip():
                    raise ValueError(f"expected provider=url, got {part!r}")
                raw[name.strip()] = url.strip()
    unknown = sorted(k for k in raw if get_spec(str(k)) is None)
    if unknown:
        raise ValueError(f"unknown provider(s) in carrier API URLs: {', '.join(unknown)}")
    for name, url in raw.items():
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"carrier API URL of {name} must be an http(s) URL")
    return {str(k): str(v).rstrip("/") for k, v in raw.items()}


def api_url(name: str, overrides: Mapping[str, str]) -> str:
    """The base URL call-control uses for a provider: the override, else the provider's default."""
    spec = get_spec(name)
    if spec is None:
        raise LookupError(f"unknown provider {name!r}")
    return overrides.get(name) or spec.default_api_url
