"""TLS and basic auth for /metrics, configured like the official Prometheus exporters.

The file uses the exporter-toolkit ``web-config.yml`` format (``tls_server_config``,
``basic_auth_users`` with bcrypt hashes); relative paths are relative to the file. Only the
fields below are supported; any other key is refused by name rather than silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import ssl
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from exporter.config import ConfigError, read_yaml

_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
"""A whole bcrypt hash: version, cost (4-31), 22 characters of salt and 31 of hash."""


class TLSServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: Path
    key_file: Path
    client_auth_type: Literal["NoClientCert", "RequireAndVerifyClientCert"] = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: Literal["TLS12", "TLS13"] = "TLS12"


class WebConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tls_server_config: TLSServerConfig | None = None
    basic_auth_users: dict[str, str] = {}


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web config file; errors name the file and the setting."""
    data = read_yaml(path, "web config") or {}
    try:
        config = WebConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"'{'.'.join(map(str, e['loc']))}': "
            + ("unknown setting" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise ConfigError(f"web config {path}: {problems}") from None
    for user, hashed in config.basic_auth_users.items():
        if not BCRYPT_HASH.fullmatch(hashed):
            raise ConfigError(
                f"web config {path}: 'basic_auth_users.{user}' is not a bcrypt hash"
                " ($2a$, $2b$ or $2y$, a cost, then 53 characters: whole)"
            )
    if config.tls_server_config is not None:
        tls_context(config.tls_server_config, path.parent)  # fail now, not at the first scrape
    return config


def tls_context(tls: TLSServerConfig, base: Path) -> ssl.SSLContext:
    """Build the server's TLS context from the config (paths relative to ``base``): a whole new
    one each time, never files loaded into a context in use (see ``MetricsServer.reload``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[tls.min_version]
    try:
        ctx.load_cert_chain(base / tls.cert_file, base / tls.key_file)
        if tls.client_auth_type == "RequireAndVerifyClientCert":
            if tls.client_ca_file is None:
                raise ConfigError(
                    "'tls_server_config.client_ca_file' is required to verify clients"
                )
            ctx.load_verify_locations(base / tls.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_server_config: cannot load the certificate or key: {exc}") from None
    return ctx


class BasicAuth:
    """Check ``Authorization: Basic`` headers against bcrypt hashes, caching successes.

    bcrypt costs ~50-100 ms by design; the cache (keyed by a SHA-256 of the credentials, never
    the password) keeps a scraper that authenticates every 15 s from paying it each time. The
    server asks :meth:`cached` on its loop and sends only the rest to :meth:`verify`.
    """

    def __init__(self, users: dict[str, str]) -> None:
        import bcrypt

        self._bcrypt = bcrypt
        self._users = {u: h.encode() for u, h in users.items()}
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()
        # An unknown user is checked against a hash as costly as the costliest known one, so
        # the time of an answer does not tell which users exist.
        cost = max((int(h[4:6]) for h in users.values()), default=10)
        self.dummy = bcrypt.hashpw(secrets.token_hex(16).encode(), bcrypt.gensalt(cost))

    @staticmethod
    def _credentials(header: str | None) -> tuple[str, str] | None:
        """User and password of a Basic header (the scheme is case-insensitive, RFC 7617)."""
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = (
                base64.b64decode(token.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return None
        return (user, password) if sep else None

    @staticmethod
    def _digest(user: str, password: str) -> bytes:
        return hashlib.sha256(f"{user}\0{password}".encode()).digest()

    def cached(self, header: str | None) -> bool | None:
        """True: a login that succeeded before; False: no Basic credentials at all; None: ask
        :meth:`verify`. Cheap: no bcrypt."""
        credentials = self._credentials(header)
        if credentials is None:
            return False
        digest = self._digest(*credentials)
        with self._lock:
            if any(hmac.compare_digest(digest, known) for known in self._ok):
                return True
        return None

    def verify(self, header: str | None) -> bool:
        """Check the password with bcrypt (slow by design); remember a success."""
        credentials = self._credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._users.get(user)
        ok = self._bcrypt.checkpw(password.encode(), hashed or self.dummy) and hashed is not None
        if ok:
            with self._lock:
                self._ok.add(self._digest(user, password))
        return ok
