"""The files connector: formats, value forms, and the one-line errors for bad rows."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import duckdb
import pytest

from connectors import files
from connectors.base import InputError
from connectors.files import FileBilling, RawEventsFile
from rules.periods import month
from rules.timeline import build_timeline
from tests.book import INVOICED, METERED, RAW, event, line, metered, write_csv

UTC_ZONE = ZoneInfo("UTC")


def october(zone: ZoneInfo = UTC_ZONE):
    return build_timeline((month(2026, 10, zone),), {}, timedelta(hours=48))


def totals(path, timeline=None) -> dict[tuple[str, str], Decimal]:
    sums: dict[tuple[str, str], Decimal] = {}
    for aggregate in RawEventsFile(path).aggregate(timeline or october(), 10):
        if aggregate.segment is not None:
            key = (aggregate.customer_id, aggregate.meter)
            sums[key] = sums.get(key, Decimal(0)) + aggregate.quantity
    return sums


def test_csv_jsonl_and_parquet_give_the_same_sums(tmp_path):
    rows = [event("e1", "1.5"), event("e2", "2.25", customer="cus_b"), event("e3", "0.000000000001")]
    csv_path = write_csv(tmp_path / "raw.csv", RAW, rows)
    jsonl_path = tmp_path / "raw.jsonl"
    jsonl_path.write_text("".join(json.dumps(dict(zip(RAW, r, strict=True))) + "\n" for r in rows))
    parquet_path = tmp_path / "raw.parquet"
    duckdb.sql(f"COPY (SELECT * FROM read_csv('{csv_path}', all_varchar = true)) TO '{parquet_path}' (FORMAT parquet)")
    expected = {("cus_a", "api_calls"): Decimal("1.500000000001"), ("cus_b", "api_calls"): Decimal("2.25")}
    assert totals(csv_path) == totals(jsonl_path) == totals(parquet_path) == expected


def test_typed_parquet_columns(tmp_path):
    path = tmp_path / "raw.parquet"
    duckdb.sql(
        f"""COPY (SELECT 'e1' AS event_id, 'cus_a' AS customer_id, 'api_calls' AS meter,
                  TIMESTAMPTZ '2026-10-10 00:00:00+00' AS timestamp, 12.5::DECIMAL(10,2) AS quantity,
                  TIMESTAMP '2026-10-10 00:01:00' AS received_at
                 UNION ALL
                 SELECT 'e2', 'cus_a', 'api_calls', TIMESTAMPTZ '2026-10-11 00:00:00+00', 0.1::DOUBLE, NULL)
            TO '{path}' (FORMAT parquet)"""
    )
    assert totals(path) == {("cus_a", "api_calls"): Decimal("12.6")}


def test_unix_seconds_and_offsets(tmp_path):
    rows = [
        event("e1", 1, timestamp="1791417600"),  # 2026-10-08T00:00:00Z
        event("e2", 2, timestamp="2026-10-01T01:30:00+02:00"),  # 2026-09-30T23:30Z: September
        event("e3", 4, timestamp="2026-10-31 23:59:59"),  # no offset: UTC
    ]
    assert totals(write_csv(tmp_path / "raw.csv", RAW, rows)) == {("cus_a", "api_calls"): Decimal(5)}


def test_period_boundary_across_dst_in_the_configured_zone(tmp_path):
    berlin = ZoneInfo("Europe/Berlin")
    rows = [
        event("oct", 1, timestamp="2026-10-31T22:59:59Z"),  # 23:59:59 CET: still October
        event("nov", 10, timestamp="2026-10-31T23:00:00Z"),  # midnight CET: November
        event("sep", 100, timestamp="2026-09-30T21:59:59Z"),  # 23:59:59 CEST: September
        event("first", 1000, timestamp="2026-09-30T22:00:00Z"),  # midnight CEST: October
    ]
    path = write_csv(tmp_path / "raw.csv", RAW, rows)
    assert totals(path, october(berlin)) == {("cus_a", "api_calls"): Decimal(1001)}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (event("e9", "12,5"), "line 3: quantity: not a decimal number ('12,5')"),
        (
            event("e9", "1", timestamp="yesterday"),
            "line 3: timestamp: not an ISO-8601 timestamp or Unix seconds ('yesterday')",
        ),
        (event("e9", "1", received_at="soon"), "line 3: received_at: not an ISO-8601 timestamp"),
        (event("", "1"), "line 3: event_id: is empty"),
        (event("e9", ""), "line 3: quantity: is empty"),
        (event("e9", "1", customer=""), "line 3: customer_id: is empty"),
    ],
)
def test_a_bad_raw_row_names_file_line_and_field(tmp_path, row, message):
    path = write_csv(tmp_path / "raw.csv", RAW, [event("e1", 1), row, event("e3", 1)])
    with pytest.raises(InputError) as caught:
        RawEventsFile(path).aggregate(october(), 10)
    assert str(caught.value) == f"{path}: {message}" or str(caught.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        # a blank key on the copy that is dropped, on a late event, before and outside the run
        (event("e1", 1, customer="  ", received_at="2026-10-10T13:00:00Z"), "line 3: customer_id: is empty"),
        (event("e9", 1, meter="\u00a0", received_at="2026-11-20T00:00:00Z"), "line 3: meter: is empty"),
        (
            event("e9", 1, customer=" ", timestamp="2026-09-30T00:00:00Z", received_at="2026-10-05T00:00:00Z"),
            "line 3: customer_id: is empty",
        ),
        (event("e9", 1, meter="", timestamp="2026-12-05T00:00:00Z"), "line 3: meter: is empty"),
        (event(" ", 1), "line 3: event_id: is empty"),
    ],
)
def test_a_blank_key_stops_the_run_wherever_its_row_falls(tmp_path, row, message):
    """customer_id and meter are trimmed per group and per copy, not per row (see
    aggregate_sql): a blank one still stops the run, whichever way its row goes."""
    path = write_csv(tmp_path / "raw.csv", RAW, [event("e1", 1, received_at="2026-10-10T12:00:00Z"), row])
    with pytest.raises(InputError) as caught:
        RawEventsFile(path).aggregate(october(), 10)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_a_bad_jsonl_row_is_named_by_its_line_even_as_a_duplicate(tmp_path):
    path = tmp_path / "raw.jsonl"
    good = dict(zip(RAW, event("e1", "1"), strict=True))
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "quantity": "x"}) + "\n")
    with pytest.raises(InputError, match=r"raw.jsonl: line 2: quantity"):
        RawEventsFile(path).aggregate(october(), 10)


def test_a_missing_column_is_named(tmp_path):
    path = tmp_path / "raw.csv"
    path.write_text("event_id,customer_id,meter,timestamp\ne1,cus_a,api_calls,2026-10-01T00:00:00Z\n")
    with pytest.raises(InputError, match=r"raw.csv: missing column 'quantity'"):
        RawEventsFile(path).aggregate(october(), 10)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        RawEventsFile(tmp_path / "nope.csv")
    (tmp_path / "raw.xlsx").write_text("")
    with pytest.raises(InputError, match="unknown file type '.xlsx'"):
        RawEventsFile(tmp_path / "raw.xlsx")


def test_bad_metered_and_invoiced_rows_name_line_and_field(tmp_path):
    meters = write_csv(tmp_path / "metered.csv", METERED, [metered(10), metered("ten")])
    lines = write_csv(tmp_path / "invoiced.csv", INVOICED, [line(1, "1.00"), line(1, "1.00", kind="refund")])
    with pytest.raises(InputError, match=r"metered.csv: line 3: quantity: not a decimal number \('ten'\)"):
        list(FileBilling(meters, None).metered())
    with pytest.raises(InputError, match=r"invoiced.csv: line 3: kind: must be one of usage, credit"):
        list(FileBilling(None, lines).invoiced())


def test_the_quick_reading_of_billing_rows_equals_the_field_by_field_one(tmp_path, monkeypatch):
    offsets = ("2026-10-01T02:00:00+02:00", " 1793491200 ")  # October in UTC, written otherwise
    meters = write_csv(
        tmp_path / "metered.csv",
        METERED,
        [metered(" 10.50 ", customer=" cus_a\u00a0", span=offsets), metered("1e3", customer=""), metered("007")],
    )
    lines = write_csv(
        tmp_path / "invoiced.csv",
        INVOICED,
        [line(" 10.5 ", "-0.10", kind="credit", currency=" USD "), line("3E-2", "1.000", meter="", customer="cus_b")],
    )

    def read() -> str:
        billing = FileBilling(meters, lines)
        return repr((list(billing.metered()), list(billing.invoiced())))  # repr: the digits too

    quick = read()
    monkeypatch.setattr(files, "_read_columns", lambda *args: None)
    assert read() == quick


def test_a_bad_billing_row_far_down_a_file_is_named_by_its_row(tmp_path):
    path = tmp_path / "metered.parquet"
    duckdb.sql(
        f"""COPY (SELECT 'cus_' || i AS customer_id, 'api_calls' AS meter, '2026-10-01T00:00:00Z' AS period_start,
                  '2026-11-01T00:00:00Z' AS period_end, CASE WHEN i = 49000 THEN 'ten' ELSE i::VARCHAR END AS quantity
                 FROM range(50000) t(i))
            TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE 1024)"""  # many row groups, read in parallel
    )
    with pytest.raises(InputError, match=r"metered.parquet: row 49001: quantity: not a decimal number \('ten'\)"):
        list(FileBilling(path, None).metered())


def test_invoice_values_are_exact_decimals_and_lower_case_currency(tmp_path):
    lines = write_csv(tmp_path / "invoiced.csv", INVOICED, [line("10.5", "0.10", currency="USD")])
    (parsed,) = FileBilling(None, lines).invoiced()
    assert (parsed.quantity, parsed.amount, parsed.currency) == (Decimal("10.5"), Decimal("0.10"), "usd")


def test_evidence_ids_are_capped_smallest_first(tmp_path):
    rows = [event(f"e{i:02d}", 1, received_at="2026-11-20T00:00:00Z") for i in range(20)]
    (aggregate,) = RawEventsFile(write_csv(tmp_path / "raw.csv", RAW, rows)).aggregate(october(), 3)
    assert aggregate.late_event_ids == ("e00", "e01", "e02")
    assert aggregate.events == 20


# Duplicates, conflicting copies, late events, catch-up events and events outside the run, of
# two customers and two meters.
MIXED_ROWS = [
    event("e1", "1.5"),
    event("e2", "2.25", customer="cus_b"),
    event("e3", 4, meter="sms"),
    event("dup", 7, received_at="2026-10-10T12:05:00Z"),
    event("dup", 7, received_at="2026-10-10T12:09:00Z"),
    event("clash", 3, received_at="2026-10-11T00:10:00Z"),
    event("clash", 5, customer="cus_b", received_at="2026-10-11T00:01:00Z"),
    event("late1", 1, timestamp="2026-10-30T00:00:00Z", received_at="2026-11-20T00:00:00Z"),
    event("late2", 2, timestamp="2026-10-30T00:00:00Z", received_at="2026-11-20T00:00:00Z", meter="sms"),
    event("late2", 2, timestamp="2026-10-30T00:00:00Z", received_at="2026-11-21T00:00:00Z", meter="sms"),
    event("sep1", 10, timestamp="2026-09-29T00:00:00Z", received_at="2026-10-05T00:00:00Z"),
    event("sep1", 10, timestamp="2026-08-31T23:00:00Z", received_at="2026-10-06T00:00:00Z"),
    event("dec", 100, timestamp="2026-12-05T00:00:00Z"),
    *[event(f"n{i}", i, customer=f"cus_{'ab'[i % 2]}", meter=["api_calls", "sms"][i % 3 == 0]) for i in range(12)],
]


def test_keys_and_ids_written_with_spaces_give_the_same_aggregates(tmp_path):
    """Every other row's id, customer and meter padded with spaces (ASCII and Unicode): the
    padded keys meet the plain ones, the padded ids are copies of the plain ones."""
    pads = [(" ", ""), ("", "\u00a0"), ("\u3000", " ")]
    padded = [
        [f"{pads[i // 2 % 3][0]}{v}{pads[i // 2 % 3][1]}" if c < 3 and i % 2 else v for c, v in enumerate(row)]
        for i, row in enumerate(MIXED_ROWS)
    ]
    plain_path = write_csv(tmp_path / "plain.csv", RAW, MIXED_ROWS)
    padded_path = write_csv(tmp_path / "padded.csv", RAW, padded)
    two_months = build_timeline((month(2026, 10, UTC_ZONE), month(2026, 11, UTC_ZONE)), {}, timedelta(hours=48))
    for timeline in (october(), two_months):
        expected = RawEventsFile(plain_path).aggregate(timeline, 10)
        assert all(any(getattr(a, field) for a in expected) for field in ("duplicate_event_ids", "origin_periods"))
        assert RawEventsFile(padded_path).aggregate(timeline, 10) == expected


def test_copies_told_apart_by_a_digit_and_ids_with_any_character(tmp_path):
    """Copies are grouped by one text of their instants, quantity and id (see aggregate_sql):
    copies a microsecond or a last digit apart stay apart, an id with commas, quotes or a line
    break comes back whole."""
    odd_id = 'a,b\n"c, d'
    rows = [
        # the same id and key, received a microsecond apart: the first counts
        event(odd_id, "0.000000000002", received_at="2026-10-10T12:00:00.000002Z"),
        event(odd_id, "0.000000000001", received_at="2026-10-10T12:00:00.000001Z"),
        # the same id, key and instants, two quantities: the smaller counts
        event("same,time", "3.5"),
        event("same,time", "3.25"),
        event("same,time", "3.25"),
        # late, with a comma in its id
        event("late,1", "1", timestamp="2026-10-30T00:00:00Z", received_at="2026-11-20T00:00:00Z"),
    ]
    aggregates = RawEventsFile(write_csv(tmp_path / "raw.csv", RAW, rows)).aggregate(october(), 10)
    on_time, late = sorted(aggregates, key=lambda a: a.receiving is not None)
    assert on_time.quantity == Decimal("3.250000000001")
    assert (on_time.events, on_time.dropped_copies, on_time.conflicting_copies) == (2, 3, 2)
    assert on_time.duplicate_event_ids == tuple(sorted((odd_id, "same,time")))
    assert (late.quantity, late.events, late.late_event_ids) == (Decimal(1), 1, ("late,1",))
