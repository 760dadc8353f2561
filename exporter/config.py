"""Configuration: one strict model, filled from a YAML file, the environment and flags.

Precedence is flags > environment > file > defaults. Every error names the setting and where
its value came from, so a bad deployment fails at start with a message a person can act on.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from exporter.catalog import OTHER
from exporter.logs import keep_secret

ENV_PREFIX = "RESOURCE_EXPORTER_"


class ConfigError(Exception):
    """A configuration value was refused; the message names the setting."""


class ProviderRule(BaseModel):
    """Map raw provider/model strings matching ``pattern`` (case-insensitive) to ``family``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    pattern: str
    price_provider: str | None = None
    """The genai-prices provider id whose list prices apply to the family (None: unpriced)."""

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
    ProviderRule(family="bedrock", pattern=r"bedrock", price_provider="aws"),
    ProviderRule(family="codex", pattern=r"codex", price_provider="openai"),
    ProviderRule(family="minimax", pattern=r"minimax", price_provider="minimax"),
    ProviderRule(family="glm", pattern=r"\bglm|zhipu", price_provider="zai"),
    ProviderRule(family="max", pattern=r"^max\b|claude-max", price_provider="anthropic"),
)


class PriceOverride(BaseModel):
    """A list price for a model the catalogue lacks or prices differently (USD per million)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    """The normalised model name, as the `model` label shows it (e.g. `glm-4.6`)."""
    provider: str | None = None
    """The provider family it applies to (None: every family)."""
    input_usd_per_mtok: Decimal = Field(ge=0, allow_inf_nan=False)
    output_usd_per_mtok: Decimal = Field(ge=0, allow_inf_nan=False)
    cache_read_usd_per_mtok: Decimal | None = Field(None, ge=0, allow_inf_nan=False)
    """Default: the input price."""
    cache_write_usd_per_mtok: Decimal | None = Field(None, ge=0, allow_inf_nan=False)
    """Default: the input price."""


RUNBOOK_URL = "https://github.com/scidex/resource-intelligence/blob/main/docs/runbook.md"
"""Where the runbook is published by default; deployments point ``mixin.runbook_url`` at theirs."""


class _Section(BaseModel):
    """A section of settings: unknown keys refused, frozen, documented by attribute
    docstrings, no NaN or infinity, no boolean where a number is expected."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads `yes`, `no`, `on` and `off` as booleans; as a number they would become
        1 or 0 (a port of 1), so a boolean is refused where a number is expected."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float):
            raise ValueError("expected a number, got a boolean (YAML reads yes/no/on/off so)")
        return value


class HttpLimits(_Section):
    """What one client of `/metrics` may cost the server (docs/security.md)."""

    head_bytes: int = Field(16384, ge=1024, le=1048576)
    """Bytes of a request line and headers; a scraper sends a few hundred. More: 431."""
    head_timeout_seconds: float = Field(10.0, gt=0, le=3600)
    """A request head must be complete this long after its first byte, or the connection is
    dropped (a client trickling bytes)."""
    idle_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    """A silent client, one that stopped reading, or a stalled TLS handshake is dropped."""
    max_connections: int = Field(0, ge=0, le=100000)
    """Open connections; 0: the file descriptor limit less 64. At the cap a new connection
    takes the place of the one trickling a head the longest, or else of the one idle the
    longest, so a scraper always gets in; a warning says so, at most once a minute."""
    auth_workers: int = Field(2, ge=1, le=64)
    """Threads checking passwords with bcrypt; a login that succeeded before never waits."""
    auth_queue: int = Field(8, ge=0, le=10000)
    """Logins waiting for a worker; more are answered 429 at once."""


class MixinSettings(_Section):
    """What only the generated dashboard and alert rules read (``python -m dashboards``).

    Kept in the exporter's configuration so one file describes a deployment: the window and
    waste rules come from the exporter's own settings, these add the alerting thresholds.
    """

    job: str = Field("resource-exporter", pattern=r'^[^"\\\s]+$')
    """The `job` label Prometheus gives the exporter's target (every rule selects it)."""
    runbook_url: str = Field(RUNBOOK_URL, pattern=r"^https?://[^\s#]+$")
    """Absolute URL of docs/runbook.md; each alert links to its own anchor."""
    grafana_url: str = Field("http://localhost:3000", pattern=r"^https?://[^\s#?]+$")
    """Absolute URL of Grafana: alerts link to the dashboard, their quest or provider selected."""
    over_budget_for: str = Field("5m", pattern=r"^[0-9]+[smhd]$")
    """How long a quest stays over (or near) a budget before QuestOverBudget (a warning) fires."""
    budget_warnings: tuple[float, ...] = (0.8, 0.9)
    """Shares of a day's or month's budget where QuestBudgetThreshold warns (1: QuestOverBudget)."""
    forecast_margin: float = Field(0.1, ge=0)
    """QuestMonthForecastOverBudget: month-end forecast over the month's budget by this share..."""
    forecast_for: str = Field("6h", pattern=r"^[0-9]+[smhd]$")
    """...for this long."""
    anomaly_factor: float = Field(3.0, gt=1)
    """QuestSpendAnomaly: the last hour's spend over this multiple of that hour's 7-day mean..."""
    anomaly_min_usd_per_hour: float = Field(5.0, ge=0)
    """...and above it by at least this many USD per hour."""
    fast_burn: float = Field(10.0, gt=0)
    """Burn rate (multiple of the sustainable daily pace) that pages: 10 spends a day in 2.4 h."""
    slow_burn: float = Field(2.0, gt=0)
    """Burn rate that opens a ticket: 2 spends a day's budget in 12 h."""
    min_allocation_usd: float = Field(10.0, ge=0)
    """Quests with a smaller daily allocation never get burn-rate alerts."""
    waste_share: float = Field(0.25, gt=0, le=1)
    """Share of a quest's window spend gone to waste above which WasteShareHigh fires."""
    waste_min_spend_usd: float = Field(10.0, ge=0)
    """Quests with less window spend never get WasteShareHigh."""
    provider_spike_factor: float = Field(3.0, gt=1)
    """ProviderSpendSpike: the 3-hour spend rate against this multiple of the 7-day rate..."""
    provider_spike_min_usd_per_hour: float = Field(5.0, ge=0)
    """...and above this many USD per hour."""
    stale_intervals: float = Field(3.0, gt=0)
    """Refresh intervals without a successful refresh before ResourceExporterStale."""
    top_quests: int = Field(8, ge=1, le=50)
    """Slices of the allocation pie before the rest becomes Other."""

    @field_validator("budget_warnings")
    @classmethod
    def _ascending_fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < v < 1 for v in value) or list(value) != sorted(set(value)):
            raise ValueError("must be ascending fractions between 0 and 1, e.g. [0.8, 0.9]")
        return value


class Settings(_Section):
    """Every setting of the exporter, with its default."""

    dsn: SecretStr | None = None
    """PostgreSQL connection string (also `DATABASE_URL`). A password in it is visible to other
    users when given as a flag: prefer `dsn_file`, `PGPASSFILE` or `DATABASE_URL`."""
    dsn_file: Path | None = None
    """A file holding the connection string (a Docker or Kubernetes secret); it takes the place
    of `dsn`. Without a password in it, libpq's `PGPASSFILE` (default `~/.pgpass`) supplies one."""
    listen: str = "0.0.0.0"
    """Address to serve `/metrics` on (`::` for IPv6)."""
    port: int = Field(9853, ge=0, le=65535)  # 0 picks a free port
    """Port to serve on (0 picks a free one)."""
    interval_seconds: float = Field(30.0, gt=0, le=86400)
    """Seconds between refreshes."""
    timezone: str = "UTC"
    """IANA zone whose midnight starts "today" (budgets, spend today)."""
    window_days: int = Field(30, ge=1, le=3660)
    """Window of the rankings, provider breakdown, waste and per-quest impact."""
    grace_hours: float = Field(6.0, ge=0, le=24 * 365)
    """Idle time before a task may count as waste (running tasks are not waste)."""
    waste_min_tokens: int = Field(1000, ge=0)
    """A wasted task used more tokens than this..."""
    waste_max_impact: float = 0.5
    """...and has at most this impact (or none measured)."""
    top_efficiency_tasks: int = Field(15, ge=1, le=1000)
    """Tasks in the impact-per-$ ranking."""
    top_waste_tasks: int = Field(20, ge=1, le=1000)
    """Wasted tasks exported one by one."""
    max_quests: int = Field(50, ge=1, le=10000)
    """Quests that keep their own label; the rest fold into `other`."""
    fold_hold_days: int = Field(7, ge=0, le=366)
    """Days a quest keeps its label after it was last among the kept ones."""
    max_layers: int = Field(10, ge=1, le=1000)
    """Layers that keep their own label."""
    max_models: int = Field(25, ge=1, le=1000)
    """Models that keep their own label: the largest by window spend and by window tokens
    (at most twice this many); the rest fold into `other`."""
    max_label_length: int = Field(128, ge=8, le=4096)
    """Longer label values are cut."""
    statement_timeout_seconds: float = Field(30.0, ge=0.001, le=3600)
    """Per-query timeout in PostgreSQL."""
    rebuild_timeout_seconds: float = Field(600.0, ge=0.001, le=86400)
    """Per-query timeout of a rebuild, which reads the whole ledger or window (the first
    refresh, each reconciliation, the spans at midnight): it grows with the daily volume."""
    work_mem_mb: int = Field(64, ge=1, le=65536)
    """`work_mem` of the exporter's session: the window's per-task aggregate stays in memory
    (one statement runs at a time). Lower, PostgreSQL may sort what it hashes: at 16 MB (and
    at its default 4 MB) the whole-ledger spend read of 1 M rows sorted them on disk, 1.1 s
    instead of 0.28."""
    max_staleness_seconds: float = Field(900.0, gt=0)
    """A query's families are dropped when it has not succeeded for this long."""
    reconcile_interval_seconds: float = Field(3600.0, ge=0)
    """How often every running sum is recomputed from the whole ledger (0: every refresh)."""
    impact_lag_seconds: float = Field(300.0, ge=0, le=86400)
    """How long after its `measured_at` an impact may commit and still be read by the next
    refresh; a later one shows at the next reconciliation (docs/semantics.md)."""
    connect_timeout_seconds: int = Field(5, ge=1, le=300)
    """Connection timeout."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """`DEBUG`, `INFO`, `WARNING` or `ERROR`."""
    web_config_file: Path | None = None
    """TLS and basic auth for `/metrics` (exporter-toolkit's web-config.yml format)."""
    server_process: bool = False
    """Serve `/metrics` from a process of its own, forked at start, so that a refresh's Python
    never holds a scrape up (p99 through rebuilds and many scrapers); it costs about 14 MiB
    more (docs/operations.md). `false`: from a thread of the exporter's process."""
    http: HttpLimits = HttpLimits()
    """What one client of `/metrics` may cost (below)."""
    providers: tuple[ProviderRule, ...] = DEFAULT_PROVIDER_RULES
    """Ordered `{family, pattern}` rules (case-insensitive regular expressions); the first
    match names the provider family, `other` takes the rest."""
    prices: tuple[PriceOverride, ...] = ()
    """List prices `{model, provider, input_usd_per_mtok, output_usd_per_mtok,
    cache_read_usd_per_mtok, cache_write_usd_per_mtok}` that add to or override the
    genai-prices catalogue."""
    mixin: MixinSettings = MixinSettings()
    """What only the generated dashboard and alert rules read (below)."""

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
_JSON_FIELDS = ("providers", "prices", "mixin", "http")
"""Structured settings: their environment variables hold JSON."""


def env_var(field: str) -> str:
    """The environment variable of a setting; a name that is no setting raises KeyError."""
    if field not in Settings.model_fields:
        raise KeyError(field)
    return ENV_PREFIX + field.upper()


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    values: dict[str, tuple[Any, str]] = {}
    if env.get("DATABASE_URL"):
        values["dsn"] = (env["DATABASE_URL"], "environment DATABASE_URL")
    for field in FIELDS:
        key = env_var(field)
        if key in env:
            raw: Any = env[key]
            if field in _JSON_FIELDS:
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"setting '{field}' (from environment {key}): not valid JSON: {exc}"
                    ) from None
            values[field] = (raw, f"environment {key}")
    return values


def unknown_environment(env: Mapping[str, str] | None = None) -> list[str]:
    """Variables with the exporter's prefix that name no setting (a typo is otherwise silent),
    each with the setting it probably meant."""
    env = os.environ if env is None else env
    names = [field.upper() for field in FIELDS]
    out = []
    for key in sorted(k for k in env if k.startswith(ENV_PREFIX)):
        name = key.removeprefix(ENV_PREFIX)
        if name in names:
            continue
        close = difflib.get_close_matches(name, names, n=1)
        out.append(f"{key} (did you mean {ENV_PREFIX}{close[0]}?)" if close else key)
    return out


def read_yaml(path: Path, what: str) -> Any:
    """The data of a YAML file; a file that cannot be read is a ``ConfigError`` naming ``what``
    and the path. PyYAML is imported by the first file read: an exporter configured by its
    environment alone (the compose stack's) never loads it: about 1 MiB less resident."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML: {exc}") from None


def _from_file(path: Path) -> dict[str, tuple[Any, str]]:
    data = read_yaml(path, "config file")
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
    if "dsn_file" in merged and merged["dsn_file"][0] is not None:
        merged["dsn"] = (_read_dsn_file(*merged["dsn_file"]), merged["dsn_file"][1])
    if "dsn" in merged and isinstance(merged["dsn"][0], str):
        keep_secret(merged["dsn"][0])  # no message prints it, however malformed
    try:
        return Settings.model_validate({k: v for k, (v, _) in merged.items()})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, merged)) from None


def _read_dsn_file(path: Any, source: str) -> str:
    """The connection string in a file (surrounding whitespace and newlines dropped)."""
    where = f"setting 'dsn_file' (from {source}): {path}"
    try:
        dsn = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8") from None
    if not dsn:
        raise ConfigError(f"{where}: the file is empty")
    return dsn


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
