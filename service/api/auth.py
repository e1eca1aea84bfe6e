"""API keys: who may call which endpoint.

Keys come from `HEADSTART_API_KEYS` and `HEADSTART_API_KEYS_FILE` as `key:scope` entries. An
`admin` key may do everything; a `predict` key may read (list, get, report) and predict, but not
export. Clients send `Authorization: Bearer <key>`. Everything under /v1 needs a key once any key
is configured; probes, metrics and the API documentation stay open. A key is never logged or
echoed in a message, not even a malformed one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass

from flask import Flask, request

from service.errors import Forbidden, Unauthorized
from service.config import Settings

log = logging.getLogger(__name__)

ADMIN, PREDICT = "admin", "predict"
SCOPES = (ADMIN, PREDICT)
MIN_KEY_LENGTH = 16
#: Methods that only read; a predict key may use them anywhere under /v1.
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The one write a predict key may make (the route's endpoint name).
_PREDICT_ENDPOINT = "v1.predict"
#: Reads a predict key may not make: an export is the whole model (weights, labels, metrics),
#: to run without the service's keys and limits, so it is the owner's call.
_ADMIN_READS = frozenset({"v1.export_classifier"})
_PROTECTED_PREFIX, _PROTECTED_BLUEPRINT = "/v1/", "v1."
# RFC 6750's token68: what a Bearer credential may contain.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class ApiKeyConfigError(ValueError):
    """The configured keys cannot be used; start-up stops. The message never holds a key."""


@dataclass(frozen=True)
class ApiKey:
    """A configured key, kept only as its SHA-256 digest, and what it may do."""

    digest: bytes
    scope: str


def load_api_keys(settings: Settings) -> list[ApiKey]:
    """The union of the keys in `api_keys` and in the file `api_keys_file`.

    Raises:
        ApiKeyConfigError: an entry without a scope, with an unknown scope, with an empty or
            short key, or the same key with two scopes; an unreadable or empty file.
    """
    keys: list[ApiKey] = []
    if settings.api_keys is not None:
        keys += parse_api_keys(settings.api_keys.get_secret_value(), "HEADSTART_API_KEYS")
    if settings.api_keys_file is not None:
        source = f"HEADSTART_API_KEYS_FILE ({settings.api_keys_file})"
        try:
            text = settings.api_keys_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ApiKeyConfigError(f"{source}: cannot read it: "
                                    f"{getattr(error, 'strerror', None) or type(error).__name__}"
                                    ) from None
        from_file = parse_api_keys(text, source)
        if not from_file:
            raise ApiKeyConfigError(f"{source} holds no keys; give it key:scope entries or unset "
                                    "the variable")
        keys += from_file
    scopes: dict[bytes, str] = {}
    for key in keys:
        if scopes.setdefault(key.digest, key.scope) != key.scope:
            raise ApiKeyConfigError("HEADSTART_API_KEYS, HEADSTART_API_KEYS_FILE: one key is "
                                    "configured with both scopes, admin and predict; give it one")
    return list({key.digest: key for key in keys}.values())


def parse_api_keys(text: str, source: str) -> list[ApiKey]:
    """Parses `key:scope` entries separated by commas or newlines; blank entries and lines
    starting with `#` are skipped. `source` names where they came from, for messages."""
    keys = []
    lines = (line.strip() for line in text.splitlines())
    entries = [entry.strip() for line in lines if not line.startswith("#")
               for entry in line.split(",")]
    for number, entry in enumerate((entry for entry in entries if entry), start=1):
        key, colon, scope = entry.rpartition(":")
        where = f"{source}, entry {number}"
        if not colon:
            raise ApiKeyConfigError(f"{where}: no scope; write key:admin or key:predict")
        if scope not in SCOPES:
            raise ApiKeyConfigError(f"{where}: unknown scope; the scopes are admin and predict")
        if not key:
            raise ApiKeyConfigError(f"{where}: the key is empty")
        if len(key) < MIN_KEY_LENGTH:
            raise ApiKeyConfigError(f"{where}: the key is shorter than {MIN_KEY_LENGTH} "
                                    "characters; generate one with `openssl rand -hex 32`")
        if not _TOKEN68.fullmatch(key):
            raise ApiKeyConfigError(f"{where}: the key has characters a Bearer token cannot "
                                    "carry; use letters, digits and -._~+/")
        keys.append(ApiKey(digest=_digest(key), scope=scope))
    return keys


def required_scope(method: str, path: str, endpoint: str | None) -> str | None:
    """The scope a request needs: None for open paths (probes, metrics, docs), `predict` for
    reads and predictions under /v1, `admin` for any other /v1 request."""
    if not (path + "/").startswith(_PROTECTED_PREFIX) and \
            not (endpoint or "").startswith(_PROTECTED_BLUEPRINT):
        return None
    if endpoint in _ADMIN_READS:
        return ADMIN
    if method in _READ_METHODS or endpoint == _PREDICT_ENDPOINT:
        return PREDICT
    return ADMIN


def require_api_keys(app: Flask, keys: list[ApiKey]) -> None:
    """Checks every request's key before its route runs; with no keys, warns that the API is
    open."""
    if not keys:
        log.warning("no API keys configured (HEADSTART_API_KEYS, HEADSTART_API_KEYS_FILE): "
                    "anyone who can reach this service can create, delete and use classifiers")
        return
    log.info("API keys configured: %d admin, %d predict",
             sum(key.scope == ADMIN for key in keys), sum(key.scope == PREDICT for key in keys))

    @app.before_request
    def check_api_key():
        needed = required_scope(request.method, request.path, request.endpoint)
        if needed is None:
            return
        try:
            authorize(keys, request.headers.get("Authorization"), needed)
        except (Unauthorized, Forbidden) as error:  # for whoever watches for probing
            log.info("refused %s %r from %s: %s", request.method, request.path,
                     request.remote_addr, error.detail)
            raise


def authorize(keys: list[ApiKey], authorization: str | None, needed: str) -> None:
    """Raises Unauthorized without a valid key, Forbidden with a key of too small a scope."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send an API key: Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": 'Bearer realm="headstart"'})
    scope = _scope_of(keys, token.strip())
    if scope is None:
        raise Unauthorized("the API key is not valid", headers={
            "WWW-Authenticate": 'Bearer realm="headstart", error="invalid_token"'})
    if needed == ADMIN and scope != ADMIN:
        raise Forbidden("this needs an admin key; a predict key may list, get, read reports "
                        "and predict", headers={
                            "WWW-Authenticate": 'Bearer realm="headstart", '
                                                'error="insufficient_scope"'})


def _scope_of(keys: list[ApiKey], token: str) -> str | None:
    # NB: digests have one length whatever the key's, and every key is compared, so the time
    # taken says neither how long a key is nor which one matched.
    presented = _digest(token)
    scope = None
    for key in keys:
        if hmac.compare_digest(presented, key.digest):
            scope = key.scope
    return scope


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
