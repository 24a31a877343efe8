"""Environment of the config service (on top of the settings every service shares)."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr

from voicebus.kit import ServiceSettings

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./.voicebus/voicebus.db"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class ConfigSettings(ServiceSettings):
    public_url: str = Field(
        default="http://127.0.0.1:8080", validation_alias=_env("VOICEBUS_PUBLIC_URL", "public_url"),
        description="Ingress's public base URL: numbers bound through the API point their webhook there.",
    )
    database_url: str = Field(
        default=DEFAULT_DATABASE_URL, validation_alias=_env("DATABASE_URL", "database_url"),
        description="SQLAlchemy URL; postgresql:// and postgres:// are accepted and run on asyncpg.",
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias=_env("REDIS_URL", "redis_url"))
    secret_key: SecretStr | None = Field(
        default=None, validation_alias=_env("VOICEBUS_SECRET_KEY", "secret_key"),
        description="Fernet key(s), comma separated; the first encrypts, all decrypt (key rotation).",
    )
    secret_key_file: str = Field(
        default="./.voicebus/secret.key", validation_alias=_env("VOICEBUS_SECRET_KEY_FILE", "secret_key_file"),
        description="Read (or created, mode 0600) when VOICEBUS_SECRET_KEY is unset.",
    )
    default_concurrent_calls: int = Field(
        default=10, ge=0, validation_alias=_env("VOICEBUS_DEFAULT_CONCURRENT_CALLS", "default_concurrent_calls"),
    )
    quota_lease_ttl_s: float = Field(
        default=30.0, gt=0, validation_alias=_env("VOICEBUS_QUOTA_LEASE_TTL_S", "quota_lease_ttl_s"),
    )
    reaper_interval_s: float = Field(
        default=5.0, gt=0, validation_alias=_env("VOICEBUS_REAPER_INTERVAL_S", "reaper_interval_s"),
    )
    run_max_age_s: float = Field(
        default=4 * 3600 + 600, gt=0, validation_alias=_env("VOICEBUS_RUN_MAX_AGE_S", "run_max_age_s"),
        description="A non-terminal run without a quota lease is ended after this long (longest call + margin).",
    )
    port: int = Field(default=8081, validation_alias=_env("VOICEBUS_CONFIG_PORT", "port"))
