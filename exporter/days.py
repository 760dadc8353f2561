"""Days of the configured timezone, as the UTC instants their midnights fall on."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

DAY = timedelta(days=1)


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    """The instant ``day`` begins in ``zone`` (DST-aware), in UTC."""
    return datetime.combine(day, datetime.min.time(), zone).astimezone(UTC)


def midnights(first: date, last: date, zone: ZoneInfo) -> list[datetime]:
    """The midnights of the days from ``first`` to ``last``, inclusive."""
    return [local_midnight(first + i * DAY, zone) for i in range((last - first).days + 1)]
