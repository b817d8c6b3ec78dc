"""The time grid of one run: its periods, their segments and their late-event windows.

Events are bucketed by this grid where they live (DuckDB, PostgreSQL), so only
aggregates come back:
- `segments` split the run's periods at every plan change inside them; an event's
  segment is the one holding its `timestamp`;
- a late event (received after its period's end + grace) is expected in the
  period whose billing window `(start + grace, end + grace]` holds its
  `received_at`: that is where the platform could still bill it (catch-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from rules.config import Meter
from rules.models import Period


@dataclass(frozen=True)
class Segment:
    start: datetime
    end: datetime
    period_index: int


@dataclass(frozen=True)
class Timeline:
    periods: tuple[Period, ...]
    segments: tuple[Segment, ...]
    grace: timedelta

    @property
    def start(self) -> datetime:
        return self.periods[0].start

    @property
    def end(self) -> datetime:
        return self.periods[-1].end

    def window_ends(self) -> tuple[datetime, ...]:
        """The close of each period's billing window: `end + grace`."""
        return tuple(p.end + self.grace for p in self.periods)

    def period_of(self, start: datetime, end: datetime) -> int | None:
        """The index of the period that holds `[start, end)`, if any."""
        for index, period in enumerate(self.periods):
            if period.covers(start, end):
                return index
        return None


def build_timeline(periods: tuple[Period, ...], meters: dict[str, Meter], grace: timedelta) -> Timeline:
    """Periods must be sorted and contiguous (one custom period, or consecutive months)."""
    cuts = {change.effective for meter in meters.values() for change in meter.plan}
    segments: list[Segment] = []
    for index, period in enumerate(periods):
        inside = sorted(c for c in cuts if period.start < c < period.end)
        edges = [period.start, *inside, period.end]
        segments.extend(Segment(a, b, index) for a, b in zip(edges, edges[1:], strict=False))
    return Timeline(periods=periods, segments=tuple(segments), grace=grace)
