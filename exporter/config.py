"""Configuration: one strict model, filled from a YAML file, the environment and flags.

Precedence is flags > environment > file > defaults. Every error names the setting and where
its value came from, so a bad deployment fails at start with a message a person can act on.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from exporter.catalog import OTHER

ENV_PREFIX = "RESOURCE_EXPORTER_"


class ConfigError(Exception):
    """A configuration value was refused; the message names the setting."""


class ProviderRule(BaseModel):
    """Map raw provider/model strings matching ``pattern`` (case-insensitive) to ``family``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("family")
    @classmethod
    def _not_other(cls, value: str) -> str:
        if value == OTHER:
            raise ValueError(f"'{OTHER}' is the implicit family of unmatched providers")
        return value


# Order matters: "MiniMax-M2" contains "max", so minimax is tried before max.
DEFAULT_PROVIDER_RULES: tuple[ProviderRule, ...] = (
    ProviderRule(family="bedrock", pattern=r"bedrock"),
    ProviderRule(family="codex", pattern=r"codex"),
    ProviderRule(family="minimax", pattern=r"minimax"),
    ProviderRule(family="glm", pattern=r"\bglm|zhipu"),
    ProviderRule(family="max", pattern=r"^max\b|claude-max"),
)


class Settings(BaseModel):
    """Every setting of the exporter, with its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dsn: SecretStr | None = None
    listen: str = "0.0.0.0"
    port: int = Field(9853, ge=0, le=65535)  # 0 picks a free port
    interval_seconds: float = Field(30.0, gt=0, le=86400)
    timezone: str = "UTC"
    window_days: int = Field(30, ge=1, le=3660)
    grace_hours: float = Field(6.0, ge=0, le=24 * 365)
    waste_min_tokens: int = Field(1000, ge=0)
    waste_max_impact: float = 0.5
    top_efficiency_tasks: int = Field(15, ge=1, le=1000)
    top_waste_tasks: int = Field(20, ge=1, le=1000)
    max_quests: int = Field(50, ge=1, le=10000)
    max_layers: int = Field(10, ge=1, le=1000)
    max_label_length: int = Field(128, ge=8, le=4096)
    statement_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    work_mem_mb: int = Field(64, ge=1, le=65536)
    max_staleness_seconds: float = Field(900.0, gt=0)
    reconcile_interval_seconds: float = Field(3600.0, ge=0)
    connect_timeout_seconds: int = Field(5, ge=1, le=300)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    web_config_file: Path | None = None
    providers: tuple[ProviderRule, ...] = DEFAULT_PROVIDER_RULES

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as 'UTC')"
            ) from None
        return value

    @field_validator("providers")
    @classmethod
    def _not_empty(cls, rules: tuple[ProviderRule, ...]) -> tuple[ProviderRule, ...]:
        if not rules:
            raise ValueError("at least one provider rule is needed")
        return rules

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def dsn_value(self) -> str:
        """Return the DSN, or raise ConfigError naming how to set it."""
        if self.dsn is None or not self.dsn.get_secret_value():
            raise ConfigError("setting 'dsn' is required: pass --dsn or set DATABASE_URL")
        return self.dsn.get_secret_value()


FIELDS = tuple(Settings.model_fields)


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    values: dict[str, tuple[Any, str]] = {}
    if env.get("DATABASE_URL"):
        values["dsn"] = (env["DATABASE_URL"], "environment DATABASE_URL")
    for field in FIELDS:
        key = ENV_PREFIX + field.upper()
        if key in env:
            raw: Any = env[key]
            if field == "providers":
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"setting 'providers' (from environment {key}): not valid JSON: {exc}"
                    ) from None
            values[field] = (raw, f"environment {key}")
    return values


def _from_file(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
    return {str(k): (v, f"config file {path}") for k, v in data.items()}


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Settings:
    """Merge file, environment and flags (highest wins) and validate them.

    ``flag_names`` maps a setting to the command-line flag that set it, for error messages.
    """
    env = os.environ if env is None else env
    merged: dict[str, tuple[Any, str]] = {}
    if config_file is not None:
        merged.update(_from_file(config_file))
    merged.update(_from_env(env))
    for key, value in (flags or {}).items():
        if value is not None:
            flag = (flag_names or {}).get(key, f"--{key.replace('_', '-')}")
            merged[key] = (value, f"flag {flag}")
    try:
        return Settings.model_validate({k: v for k, (v, _) in merged.items()})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, merged)) from None


def _describe(exc: ValidationError, merged: Mapping[str, tuple[Any, str]]) -> str:
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        field = str(loc[0]) if loc else "?"
        where = ".".join(str(p) for p in loc)
        source = merged.get(field, (None, "default"))[1]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"setting '{where}' (from {source}): {message}")
    return "; ".join(lines)
