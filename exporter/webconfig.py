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
import ssl
import threading
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from exporter.config import ConfigError

_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# A valid bcrypt hash of a random string: unknown users cost as much time as known ones.
_DUMMY_HASH = b"$2b$10$8KgnOElYFycV0582crVS7OgGTfROMPmaHLazIBsHS8i.vvQj5RfB6"


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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        config = WebConfig.model_validate(data)
    except OSError as exc:
        raise ConfigError(f"web config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"web config {path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"'{'.'.join(map(str, e['loc']))}': "
            + ("unknown setting" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise ConfigError(f"web config {path}: {problems}") from None
    for user, hashed in config.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(f"web config {path}: 'basic_auth_users.{user}' is not a bcrypt hash")
    if config.tls_server_config is not None:
        tls_context(config.tls_server_config, path.parent)  # fail now, not at the first scrape
    return config


def tls_context(tls: TLSServerConfig, base: Path) -> ssl.SSLContext:
    """Build the server's TLS context from the config (paths relative to ``base``)."""
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
    the password) keeps a scraper that authenticates every 15 s from paying it each time.
    """

    def __init__(self, users: dict[str, str]) -> None:
        import bcrypt

        self._bcrypt = bcrypt
        self._users = {u: h.encode() for u, h in users.items()}
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def __call__(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        digest = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        with self._lock:
            if any(hmac.compare_digest(digest, known) for known in self._ok):
                return True
        hashed = self._users.get(user)
        ok = self._bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
        if ok:
            with self._lock:
                self._ok.add(digest)
        return ok
