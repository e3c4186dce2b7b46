"""Remove secrets from a config before it is logged, saved or uploaded.

Three nets, because a token can hide in several places of a config:
- keys that name a secret (`token`, `hf_token`, `api_key`, `password`, ...) have their value masked
  (`token_path` is a path, not a secret, and is kept);
- URLs lose the password of their user info and the values of secret-looking query parameters
  (`?token=...`, `X-Amz-Signature=...`);
- any occurrence of a known secret value (the hub token in use, secret-looking environment
  variables) is masked wherever it appears in a string.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, List

MASK = "***"

_SECRET_WORDS = {"token", "sig", "secret", "password", "passwd", "apikey", "credential", "credentials", "signature"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "token")}
_NOT_SECRET_LAST = {"path", "file", "dir", "url", "len", "length", "count", "num", "dim", "type"}
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+):(?P<password>[^@\s/]+)@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&](?P<name>[^=&#\s]+)=)(?P<value>[^&#\s]+)")


def _words(name: str) -> List[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word]


def is_secret_key(name: str) -> bool:
    """Whether a config key or query parameter name denotes a secret value."""
    words = _words(name)
    if not words or words[-1] in _NOT_SECRET_LAST:
        return False
    if any(word in _SECRET_WORDS for word in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def secrets_from_environment() -> List[str]:
    """Values of environment variables whose names denote secrets (HF_TOKEN, WANDB_API_KEY, ...)."""
    return [value for name, value in os.environ.items() if is_secret_key(name) and len(value) >= 8]


def redact_string(text: str, known_secrets: Iterable[str] = ()) -> str:
    """Mask URL passwords, secret query parameter values and known secret values in `text`."""
    text = _URL_PASSWORD.sub(lambda match: f"{match['head']}:{MASK}@", text)
    text = _QUERY_PARAM.sub(
        lambda match: match["head"] + (MASK if is_secret_key(match["name"]) else match["value"]), text
    )
    for secret in sorted(set(known_secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text


def redact(value: Any, known_secrets: Iterable[str] = ()) -> Any:
    """A copy of a JSON-like `value` with every secret masked (see the module docstring)."""
    secrets = list(known_secrets) + secrets_from_environment()
    return _redact(value, secrets)


def _redact(value: Any, secrets: List[str]) -> Any:
    if isinstance(value, dict):
        return {
            key: (MASK if isinstance(key, str) and is_secret_key(key) and value[key] not in (None, "") else _redact(item, secrets))
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_redact(item, secrets) for item in value]
    if isinstance(value, str):
        return redact_string(value, secrets)
    return value


def scrub_strings(value: Any, known_secrets: Iterable[str]) -> Any:
    """`value` with `redact_string` applied to every string inside it; other leaves (tensors) untouched.

    The net under checkpoint content: a config JSON string that the trainer stores in its state
    loses any secret before the checkpoint is written or uploaded.
    """
    secrets = list(known_secrets)
    if isinstance(value, str):
        return redact_string(value, secrets)
    if isinstance(value, dict):
        return {key: scrub_strings(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_strings(item, secrets) for item in value]
    if isinstance(value, tuple):
        return tuple(scrub_strings(item, secrets) for item in value)
    return value
