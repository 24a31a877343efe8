"""One package per carrier. Each ``__init__`` registers its :class:`~voicebus.telephony.registry.ProviderSpec`."""
