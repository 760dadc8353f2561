"""The one configuration the dashboard and the rules are generated from.

Like kubernetes-mixin's ``_config``: a deployment changes a number once, in the exporter's own
settings file, and titles, descriptions, PromQL and thresholds follow. The window and waste
rules are the exporter's settings; ``mixin`` adds what only alerting and the dashboard read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exporter.config import MixinSettings, Settings, load_settings

DASHBOARD_UID = "scidex-resources"
"""The dashboard's uid: its address in Grafana (``/d/<uid>``), which alerts link to."""


def _plural(n: float, unit: str) -> str:
    return f"{n:g} {unit}" if n == 1 else f"{n:g} {unit}s"


@dataclass(frozen=True)
class Config:
    """Settings as the generated artifacts need them: values, and how to say them."""

    settings: Settings

    @classmethod
    def load(cls, path: Path | None = None) -> Config:
        """The settings of a YAML file (the one the exporter reads), or the defaults.

        The environment is not read: what is generated depends on the file alone.
        """
        return cls(load_settings(env={}, config_file=path))

    @property
    def mixin(self) -> MixinSettings:
        return self.settings.mixin

    @property
    def sel(self) -> str:
        """The matcher that picks the exporter's series."""
        return f'job="{self.mixin.job}"'

    @property
    def window(self) -> str:
        """The window's length in words, e.g. ``30 days``."""
        return _plural(self.settings.window_days, "day")

    @property
    def window_range(self) -> str:
        """The window as a PromQL or Grafana time range, e.g. ``30d``."""
        return f"{self.settings.window_days}d"

    @property
    def grace(self) -> str:
        """The waste grace period in words, e.g. ``6 h``."""
        return f"{self.settings.grace_hours:g} h"

    @property
    def waste_rule(self) -> str:
        """What makes a task wasted, in words."""
        s = self.settings
        return (
            f"> {s.waste_min_tokens} tokens and impact <= {s.waste_max_impact:g} or unknown, "
            f"idle for over {self.grace}"
        )

    @property
    def timezone(self) -> str:
        """The zone whose calendar days are 'today'."""
        return self.settings.timezone

    def runbook(self, alert: str) -> str:
        """The absolute runbook link of an alert (one anchor per alert)."""
        return f"{self.mixin.runbook_url}#{alert.lower()}"

    def dashboard_link(self, label: str | None = None) -> str:
        """The absolute dashboard link of an alert, its ``label`` (quest, provider) selected.

        An alert template: the label's value is URL-encoded when the alert fires, so any quest
        name makes a valid link.
        """
        url = f"{self.mixin.grafana_url.rstrip('/')}/d/{DASHBOARD_UID}"
        if label is None:
            return url
        return f"{url}?var-{label}={{{{ $labels.{label} | urlquery }}}}"


DEFAULT = Config.load()
"""The configuration of the committed dashboard and rules."""
