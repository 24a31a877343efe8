"""voicebus config service: database, encrypted credentials, quota, admin REST API and the vb.cfg API.

It is the only service that touches the database; every other service asks it over NATS, so the
schema, the encryption key and the quota rules live in exactly one place.
"""

from voicebus.config.service import ConfigService
from voicebus.config.settings import ConfigSettings

__all__ = ["ConfigService", "ConfigSettings"]
