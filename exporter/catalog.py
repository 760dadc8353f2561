"""The one catalog of metrics: names, kinds, help text, labels and units.

The exporter, the dashboards and the alert rules all import these definitions, so a metric
name is typed exactly once. This module must stay importable without psycopg or
prometheus-client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "info"]

NAMESPACE = "scidex"
OTHER = "other"
"""Label value that absorbs folded quests/layers and unmatched provider families."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric family as it appears on /metrics."""

    name: str
    """The sample name PromQL uses (counters end in ``_total``, info metrics in ``_info``)."""
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    unit: str = ""
    """Grafana unit id for panels showing this metric."""

    @property
    def family(self) -> str:
        """Return the family name as prometheus-client wants it (no ``_total``/``_info``)."""
        suffix = {"counter": "_total", "info": "_info"}.get(self.kind, "")
        return self.name.removesuffix(suffix) if suffix else self.name

    def __str__(self) -> str:
        return self.name


def _m(
    name: str, kind: Kind, help: str, labels: tuple[str, ...] = (), unit: str = ""
) -> MetricSpec:
    return MetricSpec(f"{NAMESPACE}_{name}", kind, help, labels, unit)


QLP = ("quest", "layer", "provider")
TASK = ("task_id", "quest", "layer")

# --- Spend and tokens: cumulative sums over the whole cost ledger -----------------------------
SPEND = _m(
    "spend_usd_total",
    "counter",
    "Cumulative LLM cost recorded in cost_ledger, in USD (valid rows only).",
    QLP,
    "currencyUSD",
)
TOKENS = _m(
    "tokens_total",
    "counter",
    "Cumulative LLM tokens recorded in cost_ledger, by direction: input (fresh), output,"
    " cache_read, cache_write (disjoint: their sum is every token).",
    (*QLP, "direction"),
    "short",
)
REASONING_TOKENS = _m(
    "reasoning_tokens_total",
    "counter",
    "Cumulative reasoning tokens, the part of output tokens spent on reasoning.",
    QLP,
    "short",
)
CALLS = _m(
    "llm_calls_total",
    "counter",
    "Cumulative number of LLM calls (valid cost_ledger rows).",
    QLP,
    "short",
)

# --- Models and list prices: the same running sums, by model ---------------------------------
PM = ("provider", "model")
MODEL_SPEND = _m(
    "model_spend_usd_total",
    "counter",
    "Cumulative LLM cost by provider family and model, in USD.",
    PM,
    "currencyUSD",
)
MODEL_TOKENS = _m(
    "model_tokens_total",
    "counter",
    "Cumulative LLM tokens by provider family, model and direction (as scidex_tokens_total).",
    (*PM, "direction"),
    "short",
)
MODEL_CALLS = _m(
    "model_calls_total",
    "counter",
    "Cumulative number of LLM calls by provider family and model.",
    PM,
    "short",
)
LIST_PRICE = _m(
    "list_price_usd_total",
    "counter",
    "Cumulative value of priced calls at the provider's public API list price, in USD"
    " (subscription calls included; catalogue: the prices used).",
    (*QLP, "catalogue"),
    "currencyUSD",
)
MODEL_LIST_PRICE = _m(
    "model_list_price_usd_total",
    "counter",
    "Cumulative list-price value of priced calls by provider family and model, in USD.",
    (*PM, "catalogue"),
    "currencyUSD",
)
UNPRICED_CALLS = _m(
    "unpriced_calls_total",
    "counter",
    "Cumulative calls whose model has no list price (they add nothing to list prices).",
    PM,
    "short",
)
UNPRICED_TOKENS = _m(
    "unpriced_tokens_total",
    "counter",
    "Cumulative tokens of calls whose model has no list price, by direction.",
    (*PM, "direction"),
    "short",
)

# --- Today's budget ---------------------------------------------------------------------------
QUEST_SPEND_TODAY = _m(
    "quest_spend_today_usd",
    "gauge",
    "LLM cost of the quest since the start of today (configured timezone), in USD.",
    ("quest",),
    "currencyUSD",
)
BUDGET_ALLOCATED = _m(
    "budget_allocated_usd",
    "gauge",
    "Budget allocated to the quest for today in quest_budget_allocations, in USD.",
    ("quest",),
    "currencyUSD",
)
QUEST_SPEND_MONTH = _m(
    "quest_spend_month_usd",
    "gauge",
    "LLM cost of the quest since the 1st of this month (configured timezone), in USD.",
    ("quest",),
    "currencyUSD",
)
BUDGET_ALLOCATED_MONTH_TO_DATE = _m(
    "budget_allocated_month_to_date_usd",
    "gauge",
    "Budget allocated to the quest from the 1st of this month to today inclusive, in USD.",
    ("quest",),
    "currencyUSD",
)
BUDGET_ALLOCATED_MONTH = _m(
    "budget_allocated_month_usd",
    "gauge",
    "Budget allocated to the quest for every day of this month, days ahead included, in USD.",
    ("quest",),
    "currencyUSD",
)
BUDGET_MONTH_END = _m(
    "budget_month_end_timestamp_seconds",
    "gauge",
    "End of this month in the configured timezone (Unix time): the month-end forecast's horizon.",
    (),
    "dateTimeAsIso",
)
BUDGET_UTILIZATION = _m(
    "budget_utilization_ratio",
    "gauge",
    "Today's spend divided by today's allocation; absent when there is no positive allocation.",
    ("quest",),
    "percentunit",
)

# --- Provider breakdown (window) --------------------------------------------------------------
PROVIDER_SPEND = _m(
    "provider_spend_usd",
    "gauge",
    "Cost of tasks in the window, by provider family, in USD.",
    ("provider",),
    "currencyUSD",
)
PROVIDER_TASKS = _m(
    "provider_tasks",
    "gauge",
    "Number of tasks in the window that called the provider family.",
    ("provider",),
    "short",
)
PROVIDER_TOKENS = _m(
    "provider_tokens",
    "gauge",
    "Tokens (input + output) of tasks in the window, by provider family.",
    ("provider",),
    "short",
)
PROVIDER_AVG_COST = _m(
    "provider_avg_cost_per_task_usd",
    "gauge",
    "Provider family spend in the window divided by its task count, in USD.",
    ("provider",),
    "currencyUSD",
)

PROVIDER_LIST_PRICE = _m(
    "provider_list_price_usd",
    "gauge",
    "List-price value of the priced calls of tasks in the window, by provider family, in USD.",
    ("provider",),
    "currencyUSD",
)

# --- Efficiency ranking (window, top tasks) ---------------------------------------------------
TASK_IMPACT_PER_USD = _m(
    "task_impact_per_usd",
    "gauge",
    "Impact score per USD for the top tasks by that ratio (cost > 0 and impact > 0).",
    TASK,
    "none",
)
TASK_COST = _m(
    "task_cost_usd",
    "gauge",
    "Total cost of a ranked task over all its cost_ledger rows, in USD.",
    TASK,
    "currencyUSD",
)
TASK_IMPACT = _m(
    "task_impact_score",
    "gauge",
    "Measured impact score of a ranked task (impact_ledger).",
    TASK,
    "none",
)
TASK_IMPACT_PER_LIST_USD = _m(
    "task_impact_per_list_usd",
    "gauge",
    "Impact score per list-price USD for the top tasks by that ratio (subscription tasks"
    " included: list price > 0 and impact > 0).",
    TASK,
    "none",
)
TASK_LIST_PRICE = _m(
    "task_list_price_usd",
    "gauge",
    "List-price value of a task ranked by impact per list-price USD, over all its priced calls.",
    TASK,
    "currencyUSD",
)
QUEST_IMPACT_PER_USD = _m(
    "quest_impact_per_usd",
    "gauge",
    "Sum of measured impact divided by cost, over the quest's tasks in the window.",
    ("quest",),
    "none",
)
QUEST_WINDOW_SPEND = _m(
    "quest_window_spend_usd",
    "gauge",
    "Cost of the quest's tasks in the window, in USD.",
    ("quest",),
    "currencyUSD",
)
QUEST_WINDOW_IMPACT = _m(
    "quest_window_impact_score",
    "gauge",
    "Sum of measured impact scores of the quest's tasks in the window.",
    ("quest",),
    "none",
)

# --- Waste (window) ---------------------------------------------------------------------------
TASK_WASTED_TOKENS = _m(
    "task_wasted_tokens",
    "gauge",
    "Tokens of the top wasted tasks (many tokens, impact low or unknown after the grace period).",
    TASK,
    "short",
)
TASK_WASTED_USD = _m(
    "task_wasted_usd", "gauge", "Cost of the top wasted tasks, in USD.", TASK, "currencyUSD"
)
WASTED_TOKENS = _m(
    "wasted_tokens",
    "gauge",
    "Tokens of all wasted tasks in the window.",
    ("quest", "layer"),
    "short",
)
WASTED_USD = _m(
    "wasted_usd",
    "gauge",
    "Cost of all wasted tasks in the window, in USD.",
    ("quest", "layer"),
    "currencyUSD",
)
WASTED_LIST_PRICE = _m(
    "wasted_list_price_usd",
    "gauge",
    "List-price value of all wasted tasks in the window (their priced calls), in USD.",
    ("quest", "layer"),
    "currencyUSD",
)
WASTED_TASKS = _m(
    "wasted_tasks", "gauge", "Number of wasted tasks in the window.", ("quest", "layer"), "short"
)

# --- Ledger state -----------------------------------------------------------------------------
LEDGER_LAST_CALL = _m(
    "ledger_last_call_timestamp_seconds",
    "gauge",
    "Unix time of the newest valid cost_ledger row; a stalled platform shows as an old value.",
    (),
    "dateTimeAsIso",
)
LEDGER_EXCLUDED_ROWS = _m(
    "ledger_excluded_rows",
    "gauge",
    "Ledger rows left out of every sum, by relation and reason (NULL/NaN/negative cost...).",
    ("relation", "reason"),
    "short",
)

LEDGER_METRICS: tuple[MetricSpec, ...] = (
    SPEND,
    TOKENS,
    REASONING_TOKENS,
    CALLS,
    MODEL_SPEND,
    MODEL_TOKENS,
    MODEL_CALLS,
    LIST_PRICE,
    MODEL_LIST_PRICE,
    UNPRICED_CALLS,
    UNPRICED_TOKENS,
    QUEST_SPEND_TODAY,
    BUDGET_ALLOCATED,
    BUDGET_UTILIZATION,
    QUEST_SPEND_MONTH,
    BUDGET_ALLOCATED_MONTH_TO_DATE,
    BUDGET_ALLOCATED_MONTH,
    BUDGET_MONTH_END,
    PROVIDER_SPEND,
    PROVIDER_TASKS,
    PROVIDER_TOKENS,
    PROVIDER_AVG_COST,
    PROVIDER_LIST_PRICE,
    TASK_IMPACT_PER_USD,
    TASK_COST,
    TASK_IMPACT,
    TASK_IMPACT_PER_LIST_USD,
    TASK_LIST_PRICE,
    QUEST_IMPACT_PER_USD,
    QUEST_WINDOW_SPEND,
    QUEST_WINDOW_IMPACT,
    TASK_WASTED_TOKENS,
    TASK_WASTED_USD,
    WASTED_TOKENS,
    WASTED_USD,
    WASTED_LIST_PRICE,
    WASTED_TASKS,
    LEDGER_LAST_CALL,
    LEDGER_EXCLUDED_ROWS,
)

# --- The exporter's own health ----------------------------------------------------------------
BUILD_INFO = _m(
    "exporter_build_info",
    "info",
    "Build information of the resource exporter.",
    ("version", "python_version"),
)
QUERY_SUCCESS = _m(
    "exporter_query_success",
    "gauge",
    "1 if the query succeeded in the last refresh, 0 if it failed.",
    ("query",),
    "bool",
)
QUERY_DURATION = _m(
    "exporter_query_duration_seconds",
    "gauge",
    "Duration of the query in the last refresh.",
    ("query",),
    "s",
)
QUERY_DATABASE = _m(
    "exporter_query_database_seconds",
    "gauge",
    "Of the query's duration in the last refresh, the time spent waiting for PostgreSQL "
    "(statements and streamed rows); the rest is the exporter folding the rows in.",
    ("query",),
    "s",
)
QUERY_LAST_SUCCESS = _m(
    "exporter_query_last_success_timestamp_seconds",
    "gauge",
    "Unix time the query last succeeded; its families show the data of that moment.",
    ("query",),
    "dateTimeAsIso",
)
QUERY_ERRORS = _m(
    "exporter_query_errors_total",
    "counter",
    "Failed executions of the query since the exporter started.",
    ("query",),
    "short",
)
REFRESHES = _m(
    "exporter_refreshes_total",
    "counter",
    "Refreshes attempted since the exporter started.",
    (),
    "short",
)
REFRESH_FAILURES = _m(
    "exporter_refresh_failures_total",
    "counter",
    "Refreshes in which at least one query failed, or the families could not be built.",
    (),
    "short",
)
REFRESH_SKIPPED = _m(
    "exporter_refresh_skipped_total",
    "counter",
    "Refreshes skipped because the previous one was still running.",
    (),
    "short",
)
REFRESH_DURATION = _m(
    "exporter_refresh_duration_seconds",
    "gauge",
    "Duration of the last refresh, all queries included.",
    (),
    "s",
)
BUILD_DURATION = _m(
    "exporter_build_duration_seconds",
    "gauge",
    "Time a source took to build its families in the last refresh, after its queries.",
    ("source",),
    "s",
)
RENDER_DURATION = _m(
    "exporter_render_duration_seconds",
    "gauge",
    "Time the refresh before the last one took to render the exposition, text and gzip "
    "(a refresh renders this family, so it cannot hold its own).",
    (),
    "s",
)
LAST_REFRESH = _m(
    "exporter_last_refresh_timestamp_seconds",
    "gauge",
    "Unix time the last refresh finished, successful or not.",
    (),
    "dateTimeAsIso",
)
LAST_SUCCESS = _m(
    "exporter_last_successful_refresh_timestamp_seconds",
    "gauge",
    "Unix time of the last refresh in which every query succeeded.",
    (),
    "dateTimeAsIso",
)
START_TIME = _m(
    "exporter_start_time_seconds",
    "gauge",
    "Unix time the exporter started; staleness before a first success counts from here.",
    (),
    "dateTimeAsIso",
)
REFRESH_INTERVAL = _m(
    "exporter_refresh_interval_seconds",
    "gauge",
    "Configured interval between refreshes; staleness alerts compare against it.",
    (),
    "s",
)
DATABASE_UP = _m(
    "exporter_database_up",
    "gauge",
    "1 if the last refresh could connect to PostgreSQL, 0 otherwise.",
    (),
    "bool",
)
FOLDED_LABELS = _m(
    "exporter_folded_label_values",
    "gauge",
    "Distinct label values folded into 'other' by the cardinality guard in the last refresh.",
    ("label",),
    "short",
)
CLEANED_LABELS = _m(
    "exporter_cleaned_label_values",
    "gauge",
    "Distinct label values altered by cleaning (control characters, length) in the last refresh.",
    ("label",),
    "short",
)
WINDOW = _m(
    "exporter_window_seconds",
    "gauge",
    "Configured window of the rankings, provider and waste families (window_days).",
    (),
    "s",
)
GRACE = _m(
    "exporter_waste_grace_period_seconds",
    "gauge",
    "Configured idle time before a task can count as waste (grace_hours).",
    (),
    "s",
)
SERIES = _m(
    "exporter_series", "gauge", "Number of ledger series exported by the last refresh.", (), "short"
)

HEALTH_METRICS: tuple[MetricSpec, ...] = (
    BUILD_INFO,
    QUERY_SUCCESS,
    QUERY_DURATION,
    QUERY_DATABASE,
    QUERY_LAST_SUCCESS,
    QUERY_ERRORS,
    REFRESHES,
    REFRESH_FAILURES,
    REFRESH_SKIPPED,
    REFRESH_DURATION,
    BUILD_DURATION,
    RENDER_DURATION,
    LAST_REFRESH,
    LAST_SUCCESS,
    START_TIME,
    REFRESH_INTERVAL,
    WINDOW,
    GRACE,
    DATABASE_UP,
    FOLDED_LABELS,
    CLEANED_LABELS,
    SERIES,
)

ALL_METRICS: tuple[MetricSpec, ...] = LEDGER_METRICS + HEALTH_METRICS


def by_name(name: str) -> MetricSpec:
    """Return the metric whose PromQL sample name is ``name``."""
    for metric in ALL_METRICS:
        if name in (metric.name, metric.family):
            return metric
    raise KeyError(name)
