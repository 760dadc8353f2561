"""The one place that knows grafanalib: panel builders, layout, and modern JSON.

grafanalib 0.7.1 emits legacy keys (``span``, ``rows``, nulls, ``"steps": ""``, old bar gauge
options, string datasources). Panels are built with grafanalib classes for their structure
(type, title, targets, position); the complete modern ``options``, ``fieldConfig`` and
``transformations`` travel whole under a private ``extraJson`` key that replaces grafanalib's,
and :func:`render` keeps only what Grafana 12 writes itself. Switching dashboard libraries later
touches this module only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grafanalib.core as G
from grafanalib._gen import DashboardEncoder

from exporter.catalog import MetricSpec

GRAFANA_VERSION = "12.4.11"
"""The Grafana release the JSON is written for (docker-compose pins the same one)."""
SCHEMA_VERSION = 42
DATASOURCE_VAR = "datasource"
DATASOURCE = {"type": "prometheus", "uid": "${" + DATASOURCE_VAR + "}"}
FILTER_LABELS = ("quest", "layer", "provider")
"""Labels with a dashboard variable of the same name; every selector filters on them."""

GRID_WIDTH = 24

_PANEL_KEYS = ("type", "title", "description", "gridPos", "targets", "collapsed", "panels")
# grafanalib fills noValue/decimals/custom with its own defaults; only what we set survives.
_MODERN = "__modern__"
_TARGET_KEYS = (
    "datasource",
    "editorMode",
    "expr",
    "format",
    "instant",
    "interval",
    "legendFormat",
    "range",
    "refId",
)
_DASHBOARD_KEYS = (
    "annotations",
    "description",
    "editable",
    "fiscalYearStartMonth",
    "graphTooltip",
    "id",
    "links",
    "panels",
    "refresh",
    "schemaVersion",
    "tags",
    "templating",
    "time",
    "timepicker",
    "timezone",
    "title",
    "uid",
    "version",
    "weekStart",
)


# --- PromQL ----------------------------------------------------------------------------------


def sel(metric: MetricSpec, **matchers: str) -> str:
    """Return a selector of ``metric`` filtered by every dashboard variable it has a label for.

    Extra ``matchers`` are exact-match (``label="value"``) and override the variables.
    """
    parts = [
        f'{label}=~"${label}"'
        for label in FILTER_LABELS
        if label in metric.labels and label not in matchers
    ]
    parts += [f'{label}="{value}"' for label, value in matchers.items()]
    return f"{metric.name}{{{','.join(parts)}}}" if parts else metric.name


BASIS_VAR = "basis"
BASES = (("billed", "0"), ("list price", "1"))
"""The cost basis switch: what was billed, or what the calls are worth at list price."""


def by_basis(billed: str, listed: str) -> str:
    """One query that shows ``billed`` or ``listed`` as the cost basis variable says.

    The variable's value is 0 or 1; ``and on() (vector(v) == k)`` keeps a side only when it is
    chosen, so one target serves both bases and a panel's legend and columns stay the same.
    """
    return (
        f"({billed} and on() (vector(${BASIS_VAR}) == 0))"
        f" or ({listed} and on() (vector(${BASIS_VAR}) == 1))"
    )


# --- Panel pieces ----------------------------------------------------------------------------


def target(
    expr: str, legend: str = "", *, instant: bool = False, table: bool = False, interval: str = ""
) -> G.Target:
    """A Prometheus query; ``table`` makes an instant query in table format."""
    return G.Target(
        expr=expr,
        legendFormat=legend,
        instant=instant or table,
        interval=interval,
        format="table" if table else "time_series",
    )


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    """Absolute thresholds; the first step's value is the base (None)."""
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


def override(name: str, **properties: Any) -> dict[str, Any]:
    """A field override by display name, e.g. ``override("Cost", unit="currencyUSD")``."""
    props = []
    for key, value in properties.items():
        prop = {"cellOptions": "custom.cellOptions", "width": "custom.width", "color": "color"}.get(
            key, key
        )
        props.append({"id": prop, "value": value})
    return {"matcher": {"id": "byName", "options": name}, "properties": props}


def fixed_color(color: str) -> dict[str, str]:
    return {"mode": "fixed", "fixedColor": color}


def value_colors(colors: Mapping[str, str]) -> list[dict[str, Any]]:
    """A value mapping that colours each text value (e.g. a layer) with a fixed colour."""
    return [
        {
            "type": "value",
            "options": {
                value: {"color": color, "index": i}
                for i, (value, color) in enumerate(colors.items())
            },
        }
    ]


_REDUCE_LAST = {"calcs": ["lastNotNull"], "fields": "", "values": False}
_TEXT: dict[str, Any] = {}
_LEGEND_HIDDEN = {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": False}
_TOOLTIP = {"hideZeros": False, "mode": "single", "sort": "none"}


def _panel(
    cls: type[G.Panel],
    title: str,
    description: str,
    targets: Sequence[G.Target],
    unit: str,
    options: dict[str, Any],
    *,
    custom: dict[str, Any] | None = None,
    overrides: Sequence[dict[str, Any]] = (),
    color: dict[str, Any] | None = None,
    steps: dict[str, Any] | None = None,
    decimals: int | None = None,
    mappings: Sequence[dict[str, Any]] = (),
    transformations: Sequence[Any] = (),
    **kwargs: Any,
) -> G.Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": color or {"mode": "thresholds"},
        "mappings": list(mappings),
        "thresholds": steps or thresholds((None, "green")),
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    if custom is not None:
        defaults["custom"] = custom
    modern = {
        "options": options,
        "fieldConfig": {"defaults": defaults, "overrides": list(overrides)},
        "transformations": list(transformations),
    }
    return cls(
        title=title,
        description=description,
        dataSource=DATASOURCE_VAR,
        targets=list(targets),
        extraJson={_MODERN: modern},
        **kwargs,
    )


def stat(
    title: str,
    description: str,
    targets: Sequence[G.Target],
    unit: str,
    *,
    steps: dict[str, Any] | None = None,
    decimals: int | None = None,
    color_mode: str = "value",
    text_mode: str = "auto",
) -> G.Panel:
    """A single big number (or a few, one per target)."""
    options = {
        "colorMode": color_mode,
        "graphMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "percentChangeColorMode": "standard",
        "reduceOptions": _REDUCE_LAST,
        "showPercentChange": False,
        "text": _TEXT,
        "textMode": text_mode,
        "wideLayout": True,
    }
    return _panel(
        G.Stat, title, description, targets, unit, options, steps=steps, decimals=decimals
    )


def piechart(
    title: str,
    description: str,
    targets: Sequence[G.Target],
    unit: str,
    *,
    overrides: Sequence[dict[str, Any]] = (),
) -> G.Panel:
    """Slices from the last value of each series; legend with value and percent."""
    options = {
        "displayLabels": ["percent"],
        "legend": {
            "calcs": [],
            "displayMode": "table",
            "placement": "right",
            "showLegend": True,
            "values": ["value", "percent"],
        },
        "orientation": "auto",
        "pieType": "donut",
        "reduceOptions": _REDUCE_LAST,
        "sort": "desc",
        "text": _TEXT,
        "tooltip": _TOOLTIP,
    }
    return _panel(
        G.PieChartv2,
        title,
        description,
        targets,
        unit,
        options,
        custom={"hideFrom": {"legend": False, "tooltip": False, "viz": False}},
        color={"mode": "palette-classic"},
        overrides=overrides,
    )


def bargauge(
    title: str,
    description: str,
    targets: Sequence[G.Target],
    unit: str,
    *,
    steps: dict[str, Any] | None = None,
    overrides: Sequence[dict[str, Any]] = (),
    min_value: float | None = None,
    max_value: float | None = None,
    color: dict[str, Any] | None = None,
) -> G.Panel:
    """Horizontal bars, one per series."""
    options = {
        "displayMode": "gradient",
        "legend": _LEGEND_HIDDEN,
        "maxVizHeight": 300,
        "minVizHeight": 16,
        "minVizWidth": 8,
        "namePlacement": "auto",
        "orientation": "horizontal",
        "reduceOptions": _REDUCE_LAST,
        "showUnfilled": True,
        "sizing": "auto",
        "text": _TEXT,
        "valueMode": "color",
    }
    panel = _panel(
        G.BarGauge,
        title,
        description,
        targets,
        unit,
        options,
        steps=steps,
        overrides=overrides,
        color=color,
    )
    defaults = panel.extraJson[_MODERN]["fieldConfig"]["defaults"]
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    return panel


def timeseries(
    title: str,
    description: str,
    targets: Sequence[G.Target],
    unit: str,
    *,
    overrides: Sequence[dict[str, Any]] = (),
    bars: bool = False,
) -> G.Panel:
    """Lines (or bars) over time; a bar stands for the interval that starts at its time."""
    options = {
        "legend": {
            "calcs": ["sum", "mean"],
            "displayMode": "table",
            "placement": "bottom",
            "showLegend": True,
        },
        "tooltip": {"hideZeros": False, "mode": "multi", "sort": "desc"},
    }
    custom = {
        "axisBorderShow": False,
        "axisCenteredZero": False,
        "axisColorMode": "text",
        "axisLabel": "",
        "axisPlacement": "auto",
        "barAlignment": 1,
        "barWidthFactor": 0.8,
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 10,
        "gradientMode": "none",
        "hideFrom": {"legend": False, "tooltip": False, "viz": False},
        "insertNulls": False,
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "pointSize": 4,
        "scaleDistribution": {"type": "linear"},
        "showPoints": "auto",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "none"},
        "thresholdsStyle": {"mode": "off"},
    }
    return _panel(
        G.TimeSeries,
        title,
        description,
        targets,
        unit,
        options,
        custom=custom,
        color={"mode": "palette-classic"},
        overrides=overrides,
    )


def table(
    title: str,
    description: str,
    targets: Sequence[G.Target],
    *,
    columns: Mapping[str, str],
    sort_by: str,
    overrides: Sequence[dict[str, Any]] = (),
    unit: str = "none",
) -> G.Panel:
    """Instant queries merged on their labels into one table.

    ``columns`` maps source fields (labels, or ``Value #A``... per target) to column titles, in
    display order; every other field (Time, job, instance) is hidden.
    """
    options = {
        "cellHeight": "sm",
        "frameIndex": 0,
        "showHeader": True,
        "sortBy": [{"desc": True, "displayName": sort_by}],
    }
    custom = {
        "align": "auto",
        "cellOptions": {"type": "auto"},
        "filterable": False,
        "inspect": False,
    }
    transformations = [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True, "job": True, "instance": True, "__name__": True},
                "includeByName": {},
                "indexByName": {name: i for i, name in enumerate(columns)},
                "renameByName": dict(columns),
            },
        },
        {"id": "filterFieldsByName", "options": {"include": {"names": list(columns.values())}}},
        {"id": "sortBy", "options": {"fields": {}, "sort": [{"desc": True, "field": sort_by}]}},
    ]
    return _panel(
        G.Table,
        title,
        description,
        targets,
        unit,
        options,
        custom=custom,
        overrides=overrides,
        transformations=transformations,
    )


# --- Layout ----------------------------------------------------------------------------------


class Layout:
    """Place rows and panels left to right, top to bottom.

    Every panel carries an id of its own, given by the caller: Grafana keys links, repeats and
    library panels by it, and tests find a panel by it whatever its (configurable) title.
    """

    def __init__(self) -> None:
        self.panels: list[G.Panel] = []
        self._x = self._y = self._row_h = 0

    def row(self, panel_id: int, title: str) -> Layout:
        self._newline()
        self.panels.append(
            G.RowPanel(
                id=panel_id, title=title, gridPos=G.GridPos(h=1, w=GRID_WIDTH, x=0, y=self._y)
            )
        )
        self._y += 1
        return self

    def add(self, panel_id: int, panel: G.Panel, w: int, h: int) -> Layout:
        if self._x + w > GRID_WIDTH:
            self._newline()
        panel.id = panel_id
        panel.gridPos = G.GridPos(h=h, w=w, x=self._x, y=self._y)
        self.panels.append(panel)
        self._x += w
        self._row_h = max(self._row_h, h)
        return self

    def _newline(self) -> None:
        self._y += self._row_h
        self._x = self._row_h = 0


def query_variable(name: str, label: str, metric: MetricSpec) -> G.Template:
    """A multi-select variable of a label's values, with All matching everything."""
    return G.Template(
        name=name,
        label=label,
        query=f"label_values({metric.name}, {name})",
        dataSource=DATASOURCE_VAR,
        includeAll=True,
        multi=True,
        allValue=".*",
        refresh=2,
        sort=1,
    )


def basis_variable() -> G.Template:
    """The cost basis switch (a custom variable: billed, or list price)."""
    return G.Template(
        name=BASIS_VAR,
        label="Cost basis",
        query=", ".join(f"{text} : {value}" for text, value in BASES),
        type="custom",
        default=BASES[0][1],
    )


def datasource_variable() -> G.Template:
    return G.Template(
        name=DATASOURCE_VAR, label="Data source", query="prometheus", type="datasource"
    )


# --- Rendering -------------------------------------------------------------------------------


def render(dashboard: G.Dashboard) -> dict[str, Any]:
    """Return the dashboard as the JSON Grafana 12 writes: no legacy keys, no nulls."""
    raw = json.loads(json.dumps(dashboard.to_json_data(), cls=DashboardEncoder))
    out = {k: raw[k] for k in _DASHBOARD_KEYS if raw.get(k) is not None}
    out["id"] = None
    out["schemaVersion"] = SCHEMA_VERSION
    out["panels"] = [_panel_json(p) for p in raw["panels"]]
    out["templating"] = {"list": [_variable_json(v) for v in raw["templating"]["list"]]}
    out["timepicker"] = {}
    out["annotations"] = {"list": [_builtin_annotations()]}
    return out


def _panel_json(raw: dict[str, Any]) -> dict[str, Any]:
    out = {k: raw[k] for k in _PANEL_KEYS if raw.get(k) is not None}
    out["id"] = raw["id"]
    if out["type"] == "row":
        return {k: out[k] for k in ("collapsed", "gridPos", "id", "panels", "title", "type")}
    out.update(raw[_MODERN], datasource=DATASOURCE, pluginVersion=GRAFANA_VERSION)
    out["targets"] = [_target_json(t, chr(ord("A") + i)) for i, t in enumerate(out["targets"])]
    return out


def _target_json(raw: dict[str, Any], ref_id: str) -> dict[str, Any]:
    out = {k: raw[k] for k in _TARGET_KEYS if raw.get(k) not in (None, "")}
    out.update(
        datasource=DATASOURCE, editorMode="code", refId=ref_id, range=not raw.get("instant", False)
    )
    if out.get("format") == "time_series":
        del out["format"]
    out.setdefault("legendFormat", "__auto")
    return out


def _variable_json(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "hide": 0,
        "includeAll": raw["includeAll"],
        "label": raw["label"],
        "multi": raw["multi"],
        "name": raw["name"],
        "options": [],
        "query": raw["query"],
        "refresh": raw["refresh"],
        "type": raw["type"],
    }
    if raw["type"] == "custom":  # "text : value, ..." as Grafana writes it; the first is current
        pairs = [item.split(" : ") for item in raw["query"].split(", ")]
        options = [
            {"selected": i == 0, "text": text, "value": value}
            for i, (text, value) in enumerate(pairs)
        ]
        out.update(options=options, current={"text": pairs[0][0], "value": pairs[0][1]})
    if raw["type"] == "query":
        out.update(datasource=DATASOURCE, allValue=raw["allValue"], regex="", sort=raw["sort"])
        out["query"] = {
            "qryType": 1,
            "query": raw["query"],
            "refId": "PrometheusVariableQueryEditor-VariableQuery",
        }
    return out


def _builtin_annotations() -> dict[str, Any]:
    return {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }


# --- A picture of the layout -------------------------------------------------------------------

_CELL = 4  # characters per grid column


def diagram(board: Mapping[str, Any]) -> str:
    """Draw the panels of rendered dashboard JSON on a text grid, one line per band of panels."""
    lines = []
    bands: dict[int, list[dict[str, Any]]] = {}
    for panel in board["panels"]:
        bands.setdefault(panel["gridPos"]["y"], []).append(panel)
    for y in sorted(bands):
        panels = sorted(bands[y], key=lambda p: p["gridPos"]["x"])
        if panels[0]["type"] == "row":
            title = f" {panels[0]['title']} "
            lines.append(f"{title:─^{GRID_WIDTH * _CELL}}")
            continue
        line = ""
        for p in panels:
            width = p["gridPos"]["w"] * _CELL
            line = line.ljust(p["gridPos"]["x"] * _CELL)
            line += "[" + p["title"][: width - 2].ljust(width - 2) + "]"
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"
