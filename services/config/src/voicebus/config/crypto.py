"""Encryption at rest and masking of secrets (carrier credentials, LLM API keys).

Secrets are addressed by *paths* into a JSON object (``("bearer_token",)``, ``("llm", "api_key")``),
so one set of helpers serves both the provider specs' sensitive fields and the agent definition's
``SECRET_PATHS``. Each stored secret is a Fernet token tagged ``fernet:v1:`` so a later format can be
told apart.
"""

from __future__ import annotations

import copy
import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger("voicebus.config.secrets")

TAG = "fernet:v1:"
MASK = "****"
# Responses show the last 4 characters (the contract admins rely on to tell tokens apart); below 8
# characters that would give half the secret or more away, so those are masked completely.
MIN_LEN_TO_SHOW_TAIL = 8

Path_ = tuple[str, ...]


class SecretKeyError(RuntimeError):
    """The configured key is unusable; the service must not start with it."""


class SecretUnreadable(RuntimeError):
    """A stored secret does not decrypt with the configured key(s) (the key was changed or lost)."""


class MaskedValueError(ValueError):
    def __init__(self, path: Path_) -> None:
        self.path = path
        super().__init__(
            f"{'.'.join(path)} is a masked value ('****…') that does not match the stored secret; "
            "submit the real secret, or send back exactly the masked value you received to keep it"
        )


def mask(value: Any) -> Any:
    """``"****" + last 4`` for long secrets, ``"****"`` for short ones; empty and None pass through."""
    if value is None or value == "":
        return value
    s = str(value)
    return MASK + s[-4:] if len(s) >= MIN_LEN_TO_SHOW_TAIL else MASK


def looks_masked(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(MASK)


def _parse_keys(raw: str) -> list[bytes]:
    keys = [k.strip().encode() for k in raw.split(",") if k.strip()]
    if not keys:
        raise SecretKeyError("VOICEBUS_SECRET_KEY is empty")
    for k in keys:
        try:
            Fernet(k)
        except (ValueError, TypeError):
            raise SecretKeyError(
                "VOICEBUS_SECRET_KEY must be a urlsafe base64-encoded 32-byte Fernet key (generate one with "
                "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)"
            ) from None
    return keys


def load_keys(secret_key: str | None, key_file: str | os.PathLike[str]) -> list[bytes]:
    """Keys from the environment, else from the key file (created on first start, mode 0600)."""
    if secret_key:
        return _parse_keys(secret_key)
    path = Path(key_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: when two processes start at once (serve and create-org) exactly one creates the key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("secret key file %s is readable by others (mode %o); chmod 600 it", path, mode)
        raw = path.read_text().strip()
        if not raw:
            raise SecretKeyError(f"secret key file {path} is empty") from None
        try:
            return _parse_keys(raw)
        except SecretKeyError:
            raise SecretKeyError(f"secret key file {path} does not hold a valid Fernet key") from None
    key = Fernet.generate_key()
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    log.warning("VOICEBUS_SECRET_KEY is not set: created a new secret key file at %s (mode 0600). "
                "Back it up; stored credentials cannot be decrypted without it.", path)
    return [key]


class SecretBox:
    def __init__(self, keys: Iterable[bytes]) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    @classmethod
    def generate(cls) -> SecretBox:
        return cls([Fernet.generate_key()])

    def encrypt(self, plaintext: str) -> str:
        return TAG + self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, stored: str) -> str:
        if not stored.startswith(TAG):  # written before encryption existed, or an empty placeholder
            return stored
        try:
            return self._fernet.decrypt(stored[len(TAG):].encode()).decode()
        except InvalidToken:
            raise SecretUnreadable(
                "a stored secret cannot be decrypted with the configured VOICEBUS_SECRET_KEY "
                "(was the key changed? keep the old key listed after the new one to rotate)"
            ) from None

    # ---- JSON objects with secrets at given paths ------------------------------------------------
    def encrypt_paths(self, data: dict[str, Any], paths: Iterable[Path_]) -> dict[str, Any]:
        return transform(data, paths, lambda v: self.encrypt(v) if isinstance(v, str) and v else v)

    def decrypt_paths(self, data: dict[str, Any], paths: Iterable[Path_]) -> dict[str, Any]:
        return transform(data, paths, lambda v: self.decrypt(v) if isinstance(v, str) and v else v)

    def mask_paths(self, stored: dict[str, Any], paths: Iterable[Path_]) -> dict[str, Any]:
        """Masked view of a stored (encrypted) object; an unreadable secret shows as plain ``****``."""

        def one(v: Any) -> Any:
            if not isinstance(v, str) or not v:
                return mask(v)
            try:
                return mask(self.decrypt(v))
            except SecretUnreadable:
                return MASK

        return transform(stored, paths, one)


_MISSING = object()


def get_path(data: dict[str, Any], path: Path_) -> Any:
    cur: Any = data
    for part in path:
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def transform(data: dict[str, Any], paths: Iterable[Path_], fn: Callable[[Any], Any]) -> dict[str, Any]:
    """A deep copy of ``data`` with ``fn`` applied to the value at each existing path."""
    out = copy.deepcopy(data)
    for path in paths:
        parent: Any = out
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and path[-1] in parent:
            parent[path[-1]] = fn(parent[path[-1]])
    return out


def restore_masked(submitted: dict[str, Any], stored_plain: dict[str, Any] | None,
                   paths: Iterable[Path_]) -> dict[str, Any]:
    """Put the stored secret back wherever the client echoed its masked form.

    A client edits a form that was filled from a GET, so unchanged secrets come back masked. A
    masked-looking value that does not match what is stored is refused rather than saved, because
    saving it would silently replace a working secret with asterisks.
    """
    out = copy.deepcopy(submitted)
    for path in paths:
        value = get_path(out, path)
        if not looks_masked(value):
            continue
        stored = get_path(stored_plain or {}, path)
        if stored is _MISSING or not isinstance(stored, str) or not stored or mask(stored) != value:
            raise MaskedValueError(path)
        out = transform(out, [path], lambda _v, s=stored: s)
    return out
