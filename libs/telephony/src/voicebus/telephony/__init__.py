"""Telephony: one provider SPI (no carrier names) and one package per carrier on it.

- ``stream``: media-socket dialects and handshakes (ingress).
- ``webhook``: inbound and status webhooks, answer markup (ingress).
- ``verify``: signatures (call-control, which holds the secrets).
- ``rest``: hangup, dial, call status, number binding (call-control).
- ``calls``: carrier-neutral statuses, outcomes and ``CarrierError``.
- ``dialects``: wire formats shared by several carriers.
- ``registry``: every provider's :class:`ProviderSpec`; the only way services find a provider.
"""

from voicebus.telephony.registry import ProviderSpec, UIField, all_specs, api_url, get_spec, load_fake, parse_api_urls

__all__ = ["ProviderSpec", "UIField", "all_specs", "api_url", "get_spec", "load_fake", "parse_api_urls"]
