"""Provider registry: one :class:`ProviderSpec` per carrier, registered when its package is imported."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

FieldType = Literal["text", "password", "textarea", "string-array", "number", "url"]


@dataclass(frozen=True)
class UIField:
    name: str
    label: str
    type: FieldType = "text"
    sensitive: bool = False
    required: bool = True
    description: str = ""


@dataclass(frozen=True)
class ProviderSpec:
    """What the rest of voicebus needs to know about a carrier.

    ``credentials_model`` validates what an admin submits; fields listed in ``ui_fields`` with
    ``sensitive=True`` are encrypted at rest and masked in every response. ``account_id_field`` names
    the credential that identifies the carrier account (Cloudonix: ``domain_id``), used to match an
    incoming call to one of an organization's several configurations.
    """

    name: str
    display_name: str
    credentials_model: type[BaseModel]
    ui_fields: tuple[UIField, ...]
    account_id_field: str
    normalize_account_id: Callable[[str], str] = lambda v: v.strip()
    supports_agent_stream: bool = False
    docs_url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sensitive_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.ui_fields if f.sensitive)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "docs_url": self.docs_url,
            "supports_agent_stream": self.supports_agent_stream,
            "account_id_field": self.account_id_field,
            "fields": [f.__dict__ for f in self.ui_fields],
        }


_REGISTRY: dict[str, ProviderSpec] = {}
_PROVIDER_PACKAGES = ("cloudonix", "twilio", "vonage", "plivo", "telnyx", "vobiz", "ari")
_loaded = False


def register(spec: ProviderSpec) -> ProviderSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"provider {spec.name!r} registered twice")
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
    _load()
    return sorted(_REGISTRY.values(), key=lambda s: s.name)
