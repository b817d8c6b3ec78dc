"""Billing periods: half-open `[start, end)` in the configured time zone, as UTC instants.

A month is midnight of its first day to midnight of the next month's first day in
the zone, so a month that crosses a DST change is 743 or 745 hours long, as it
should be. A custom period is `2026-10-15..2026-11-15` (dates in the zone, or
datetimes with offsets).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from rules.models import Period

MONTH = re.compile(r"^(\d{4})-(\d{2})$")


class PeriodError(ValueError):
    """A period argument that cannot be read."""


def month(year: int, month_number: int, zone: ZoneInfo) -> Period:
    start = datetime(year, month_number, 1, tzinfo=zone)
    following = datetime(year + month_number // 12, month_number % 12 + 1, 1, tzinfo=zone)
    return Period(start.astimezone(UTC), following.astimezone(UTC), f"{year:04d}-{month_number:02d}")


def month_of(instant: datetime, zone: ZoneInfo) -> Period:
    local = instant.astimezone(zone)
    return month(local.year, local.month, zone)


def last_closed(now: datetime, zone: ZoneInfo, close_after: timedelta) -> Period:
    """The latest month whose end lies at least `close_after` before `now`."""
    current = month_of(now - close_after, zone)
    return month_of(current.start - timedelta(seconds=1), zone)


def months_covering(start: datetime, end: datetime, zone: ZoneInfo) -> tuple[Period, ...]:
    """The calendar months that together cover `[start, end)`."""
    periods = [month_of(start, zone)]
    while periods[-1].end < end:
        periods.append(month_of(periods[-1].end, zone))
    return tuple(periods)


def parse_periods(text: str, zone: ZoneInfo) -> tuple[Period, ...]:
    """`2026-10` (a month), `2026-09..2026-10` (months, both included) or `START..END`
    (one custom period, dates or datetimes)."""
    text = text.strip()
    first, dots, last = text.partition("..")
    if dots and MONTH.match(first.strip()) and MONTH.match(last.strip()):
        start, end = _month(first.strip()), _month(last.strip())
        if end < start:
            raise PeriodError(f"--period: {text!r} ends before it starts")
        return months_covering(month(*start, zone).start, month(*end, zone).end, zone)
    return (parse_period(text, zone),)


def _month(text: str) -> tuple[int, int]:
    found = MONTH.match(text)
    assert found is not None
    year, number = int(found[1]), int(found[2])
    if not 1 <= number <= 12:
        raise PeriodError(f"--period: no month {number} in {text!r}")
    return year, number


def parse_period(text: str, zone: ZoneInfo) -> Period:
    """`2026-10` (a month) or `START..END` (one custom period; one that is exactly a calendar
    month in `zone` is that month, label and all, so both spellings make the same run)."""
    text = text.strip()
    if MONTH.match(text):
        return month(*_month(text), zone)
    if ".." in text:
        first, _, last = text.partition("..")
        start, end = _instant(first, zone), _instant(last, zone)
        if end <= start:
            raise PeriodError(f"--period: {text!r} ends before it starts")
        return Period(start, end, label_for(start, end, zone))
    raise PeriodError(f"--period: expected YYYY-MM or START..END (got {text!r})")


def _instant(text: str, zone: ZoneInfo) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise PeriodError(f"--period: {text!r} is not a date or a datetime") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(UTC)


def _label(instant: datetime, zone: ZoneInfo) -> str:
    local = instant.astimezone(zone)
    if local.time() == datetime.min.time():
        return local.date().isoformat()
    return local.isoformat()


def cutoff(period: Period, grace: timedelta) -> datetime:
    """Events received after this instant are late for `period`."""
    return period.end + grace


def label_for(period_start: datetime, period_end: datetime, zone: ZoneInfo) -> str:
    """A month label when the span is a calendar month, else `START..END`."""
    candidate = month_of(period_start, zone)
    if candidate.start == period_start and candidate.end == period_end:
        return candidate.label
    return f"{_label(period_start, zone)}..{_label(period_end, zone)}"


def as_date(instant: datetime, zone: ZoneInfo) -> date:
    return instant.astimezone(zone).date()


def infer_periods(spans: set[tuple[datetime, datetime]], zone: ZoneInfo) -> tuple[Period, ...]:
    """The run's periods from the records' own `[period_start, period_end)` spans.

    Spans inside another span (a proration line) are set aside. Calendar months
    give every month from the first to the last; one other span is one custom
    period; anything else needs an explicit `--period`.
    """
    if not spans:
        raise PeriodError("--period: required, since no metered row or invoice line gives a period")
    outer = sorted(s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans))
    months = [month_of(start, zone) for start, _ in outer]
    if all(m.start == s and m.end == e for m, (s, e) in zip(months, outer, strict=True)):
        return months_covering(outer[0][0], outer[-1][1], zone)
    if len(outer) == 1:
        start, end = outer[0]
        return (Period(start, end, label_for(start, end, zone)),)
    raise PeriodError(
        f"--period: required, since the records' periods are not calendar months "
        f"({label_for(*outer[0], zone)} and {label_for(*outer[1], zone)})"
    )
