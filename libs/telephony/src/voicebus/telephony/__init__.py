"""Telephony providers: everything about one carrier lives in ``providers/<name>/``.

The registry is the only way other code reaches a provider, so adding a carrier never touches
ingress, call-control or config: they ask the registry for the spec by name.
"""

from voicebus.telephony.registry import ProviderSpec, UIField, all_specs, get_spec

__all__ = ["ProviderSpec", "UIField", "all_specs", "get_spec"]
