"""Type-check dashboard JSON against Grafana's own types (npm ``@grafana/schema``) with ``tsc``.

The JSON is emitted as a TypeScript constant with ``satisfies`` on the dashboard, on every panel
and on every panel's ``options`` and ``fieldConfig.defaults.custom`` (typed per plugin), so an
unknown key or a wrong type anywhere is a compile error. Importing the JSON file instead would
check almost nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
_RAW = "@grafana/schema/dist/esm/raw/composable"
# panel type -> (module, has a FieldConfig type for fieldConfig.defaults.custom)
PANEL_TYPES: dict[str, tuple[str, bool]] = {
    "stat": (f"{_RAW}/stat/panelcfg/x/StatPanelCfg_types.gen", False),
    "piechart": (f"{_RAW}/piechart/panelcfg/x/PieChartPanelCfg_types.gen", True),
    "timeseries": (f"{_RAW}/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen", True),
    "table": (f"{_RAW}/table/panelcfg/x/TablePanelCfg_types.gen", True),
    "bargauge": (f"{_RAW}/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen", False),
}

# String enums of the schema only accept their members, not the equal string literals that JSON
# holds; Loose<T> turns each string enum into the union of its values, recursively.
_PRELUDE = """\
import type {{ Dashboard, Panel, RowPanel }} from "@grafana/schema";
{imports}
type Loose<T> = T extends string
  ? `${{T}}`
  : T extends Array<infer U>
    ? Array<Loose<U>>
    : T extends object
      ? {{ [K in keyof T]: Loose<T[K]> }}
      : T;

"""


@dataclass(frozen=True)
class _Typed:
    value: Any
    type: str


def _ts(value: Any, indent: int = 0) -> str:
    pad = "  " * (indent + 1)
    if isinstance(value, _Typed):
        return f"({_ts(value.value, indent)}) satisfies {value.type}"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}{json.dumps(k)}: {_ts(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        items = [pad + _ts(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    return json.dumps(value, ensure_ascii=False)


def _alias(panel_type: str) -> str:
    return "p_" + panel_type


def _typed_panel(panel: dict[str, Any]) -> _Typed:
    if panel["type"] == "row":
        return _Typed(panel, "Loose<RowPanel>")
    if panel["type"] not in PANEL_TYPES:
        return _Typed(panel, "Loose<Panel>")
    alias = _alias(panel["type"])
    out = dict(panel)
    if "options" in out:
        out["options"] = _Typed(out["options"], f"Loose<{alias}.Options>")
    field_config = out.get("fieldConfig")
    if field_config and "custom" in field_config.get("defaults", {}):
        custom_type = f"Loose<{alias}.FieldConfig>" if PANEL_TYPES[panel["type"]][1] else "{}"
        defaults = dict(field_config["defaults"])
        defaults["custom"] = _Typed(defaults["custom"], custom_type)
        out["fieldConfig"] = {**field_config, "defaults": defaults}
    return _Typed(out, "Loose<Panel>")


def to_typescript(dashboard: dict[str, Any]) -> str:
    """Return a TypeScript module whose compilation checks ``dashboard`` against the schema."""
    imports = "\n".join(
        f'import type * as {_alias(kind)} from "{module}";'
        for kind, (module, _) in sorted(PANEL_TYPES.items())
    )
    board = dict(dashboard)
    board["panels"] = [_typed_panel(p) for p in dashboard.get("panels", [])]
    return (
        _PRELUDE.format(imports=imports)
        + f"export const dashboard = {_ts(_Typed(board, 'Loose<Dashboard>'))};\n"
    )


def tsc_command() -> list[str]:
    """Return the tsc invocation; raise FileNotFoundError if the npm packages are missing."""
    tsc = SCHEMA_DIR / "node_modules" / ".bin" / "tsc"
    node = shutil.which("node")
    if not tsc.exists() or node is None:
        raise FileNotFoundError(f"run 'npm ci --prefix {SCHEMA_DIR}' (needs node and npm)")
    return [
        str(tsc),
        "--noEmit",
        "--strict",
        "--target",
        "es2022",
        "--module",
        "esnext",
        "--moduleResolution",
        "bundler",
        "--skipLibCheck",
        "--pretty",
        "false",
    ]


def check(dashboard: dict[str, Any], name: str = "dashboard") -> list[str]:
    """Type-check one dashboard; return tsc's error lines (empty when it conforms)."""
    workdir = SCHEMA_DIR / "check"
    workdir.mkdir(exist_ok=True)
    source = workdir / f"{name}.ts"
    source.write_text(to_typescript(dashboard), encoding="utf-8")
    result = subprocess.run(
        [*tsc_command(), str(source)], capture_output=True, text=True, cwd=SCHEMA_DIR, check=False
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
