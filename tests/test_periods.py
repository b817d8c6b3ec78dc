from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from rules.periods import PeriodError, infer_periods, month, parse_periods

BERLIN = ZoneInfo("Europe/Berlin")


def test_a_month_across_the_autumn_dst_change_is_745_hours():
    october = month(2026, 10, BERLIN)
    assert october.start == datetime(2026, 9, 30, 22, tzinfo=UTC)
    assert october.end == datetime(2026, 10, 31, 23, tzinfo=UTC)
    assert october.end - october.start == timedelta(hours=745)


def test_a_month_across_the_spring_dst_change_is_743_hours():
    march = month(2026, 3, BERLIN)
    assert march.end - march.start == timedelta(hours=743)


def test_december_ends_at_new_year():
    assert month(2026, 12, ZoneInfo("UTC")).end == datetime(2027, 1, 1, tzinfo=UTC)


def test_period_arguments():
    utc = ZoneInfo("UTC")
    assert [p.label for p in parse_periods("2026-09..2026-11", utc)] == ["2026-09", "2026-10", "2026-11"]
    (custom,) = parse_periods("2026-10-15..2026-11-15", utc)
    assert (custom.start, custom.label) == (datetime(2026, 10, 15, tzinfo=UTC), "2026-10-15..2026-11-15")
    berlin = ZoneInfo("Europe/Berlin")  # a calendar month spelled as dates is that month, label and all
    assert parse_periods("2026-10-01..2026-11-01", berlin) == (month(2026, 10, berlin),)
    assert parse_periods("2026-10-01T00:00:00+02:00..2026-11-01T00:00:00+01:00", berlin)[0].label == "2026-10"
    assert parse_periods("2026-10-01..2026-11-01", utc)[0].label == "2026-10"
    assert parse_periods("2026-10-01..2026-11-01", berlin) != parse_periods("2026-10-01..2026-11-01", utc)
    with pytest.raises(PeriodError, match="--period"):
        parse_periods("October", utc)
    with pytest.raises(PeriodError, match="no month 13"):
        parse_periods("2026-13", utc)
    with pytest.raises(PeriodError, match="ends before"):
        parse_periods("2026-11-01..2026-10-01", utc)


def test_inferred_periods_fill_the_months_between_and_ignore_partial_lines():
    utc = ZoneInfo("UTC")
    sep, nov = month(2026, 9, utc), month(2026, 11, utc)
    partial = (datetime(2026, 9, 16, tzinfo=UTC), sep.end)
    periods = infer_periods({(sep.start, sep.end), (nov.start, nov.end), partial}, utc)
    assert [p.label for p in periods] == ["2026-09", "2026-10", "2026-11"]


def test_inferred_periods_refuse_overlapping_anniversaries():
    utc = ZoneInfo("UTC")
    a = (datetime(2026, 10, 5, tzinfo=UTC), datetime(2026, 11, 5, tzinfo=UTC))
    b = (datetime(2026, 10, 15, tzinfo=UTC), datetime(2026, 11, 15, tzinfo=UTC))
    with pytest.raises(PeriodError, match="required"):
        infer_periods({a, b}, utc)
