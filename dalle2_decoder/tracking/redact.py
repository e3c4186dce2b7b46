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

import logging
import os
import re
import sys
import threading
from typing import Any, Iterable, List

MASK = "***"

_SECRET_WORDS = {"token", "sig", "secret", "password", "passwd", "apikey", "credential", "credentials", "signature"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "token")}
# A word ending in one of these is a secret glued to its prefix (PGPASSWORD, HFTOKEN, clientsecret).
_GLUED_SECRET_ENDINGS = ("token", "password", "passwd", "secret")
_NOT_SECRET_LAST = {"path", "file", "dir", "url", "len", "length", "count", "num", "dim", "type"}
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+):(?P<password>[^@\s/]+)@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&](?P<name>[^=&#\s]+)=)(?P<value>[^&#\s]+)")


def _words(name: str) -> List[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", spaced)  # an acronym before a word: HFToken, APIKey
    return [word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word]


def is_secret_key(name: str) -> bool:
    """Whether a config key or query parameter name denotes a secret value."""
    words = _words(name)
    if not words or words[-1] in _NOT_SECRET_LAST:
        return False
    if any(word in _SECRET_WORDS or word.endswith(_GLUED_SECRET_ENDINGS) for word in words):
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
            key: (
                MASK
                if isinstance(key, str) and is_secret_key(key) and value[key] not in (None, "")
                else _redact(item, secrets)
            )
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


# --- one redaction for everything the process prints, logs or uploads ---------------------------


def secrets_in(value: Any) -> List[str]:
    """Secret values found inside a JSON-like config: values of secret keys, URL passwords and
    secret query parameter values. Masked wherever they appear later (in any string)."""
    found: List[str] = []

    def walk(item: Any, secret_key: bool) -> None:
        if isinstance(item, dict):
            for key, child in item.items():
                walk(child, isinstance(key, str) and is_secret_key(key))
        elif isinstance(item, (list, tuple)):
            for child in item:
                walk(child, secret_key)
        elif isinstance(item, str):
            if secret_key and item:
                found.append(item)
            found.extend(match["password"] for match in _URL_PASSWORD.finditer(item))
            found.extend(match["value"] for match in _QUERY_PARAM.finditer(item) if is_secret_key(match["name"]))

    walk(value, False)
    # very short values would mask unrelated text everywhere; they are still masked by key and URL rules
    return [secret for secret in dict.fromkeys(found) if len(secret) >= 4]


class Redactor:
    """The set of secrets this process knows, and the one redaction applied to all its output.

    Secrets are added as they become known (the config's at start, the hub token once read); the
    environment's secret-looking variables are always included.
    """

    def __init__(self) -> None:
        self._secrets: List[str] = []

    def add(self, secrets: Iterable[str]) -> None:
        for secret in secrets:
            if secret and secret not in self._secrets:
                self._secrets.append(secret)

    @property
    def secrets(self) -> List[str]:
        return self._secrets + secrets_from_environment()

    def text(self, text: str) -> str:
        return redact_string(text, self.secrets)

    def value(self, value: Any) -> Any:
        return _redact(value, self.secrets)


OUTPUT = Redactor()
"""The process-wide redactor: what `install_output_redaction` applies to stdout, stderr and logging."""


class _RedactingStream:
    """Stands in for sys.stdout / sys.stderr: every write is redacted, everything else delegated.

    A tool that patches `write` on this object (wandb's console capture does, when imported after
    this is installed) gets the redacted text: its hook is called with it, and its call back to the
    original `write` (this one) passes straight through to the inner stream.
    """

    def __init__(self, inner, redactor: Redactor) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_redactor", redactor)
        object.__setattr__(self, "_hook", None)
        object.__setattr__(self, "_local", threading.local())

    def write(self, text):
        local = self._local
        if getattr(local, "inside", False):  # the hook calling back the write it replaced
            return self._inner.write(text)
        if isinstance(text, str):
            text = self._redactor.text(text)
        if self._hook is None:
            return self._inner.write(text)
        local.inside = True
        try:
            return self._hook(text)
        finally:
            local.inside = False

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value) -> None:
        if name == "write":
            object.__setattr__(self, "_hook", value)
        else:
            setattr(self._inner, name, value)


class _RedactingFilter(logging.Filter):
    """Formats a log record's message once, redacted (a handler filter: it sees every record)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        record.msg, record.args = self.redactor.text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redactor.text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.redactor.text(record.exc_text)
        return True


def install_output_redaction(secrets: Iterable[str] = (), redactor: Redactor = OUTPUT) -> Redactor:
    """Add `secrets` to the process-wide redactor and make sure stdout, stderr and every handler of
    the root logger pass through it (idempotent; dataloader workers forked later inherit it)."""
    redactor.add(secrets)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _RedactingStream):
            setattr(sys, name, _RedactingStream(stream, redactor))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, _RedactingFilter) for existing in handler.filters):
            handler.addFilter(_RedactingFilter(redactor))
    return redactor
