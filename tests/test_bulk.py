"""The bulk judging of a stored run (bot.bulk) gives the report the rules give key by key.

A run with a store judges each shape of plain key once and writes those keys' lines in
DuckDB; a run without one judges every key in Python (`rules.reconcile`). Generated books
mix plain keys with every reason a key is not plain, so both halves of the bulk path and
the border between them are held to the reference, byte for byte.
"""

from __future__ import annotations

import io
from decimal import ROUND_CEILING, Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.render import JsonSpool, write_json
from bot.service import RunResult, SourcePaths, reconcile_files
from bot.store import Store
from connectors.files import RawEventsFile, aggregates_table, raw_aggregates
from rules.config import parse_config
from rules.periods import parse_periods
from rules.timeline import build_timeline
from tests.book import SEP, config_text, event, line, metered, write_book

EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Ids JSON writes as they are, and ids it escapes (a quote, a backslash, a control character).
CUSTOMERS = ["cus_a", "cus_b", "cus_é", 'cus_"q"', "cus\\b", "cus\tc"]
# `sms` changes plan inside October (never plain); `fax` is in no config (unmapped); `eu_calls`
# is priced in euros (its usd lines are foreign).
METERS = ["api_calls", "api_calls", "sms", "fax", "eu_calls"]
PLAN = """
[[meters]]
name = "eu_calls"
unit_size = 1000
rounding = "half_up"
included = 0
unit_price = "2.00"
currency = "eur"

[[meters]]
name = "sms"
unit_size = 1
rounding = "down"
included = 10
unit_price = "0.05"
currency = "usd"

[[meters.plan]]
from = "2026-10-16T00:00:00Z"
included = 20
unit_price = "0.04"
"""

keys = st.tuples(
    st.sampled_from(CUSTOMERS),
    st.sampled_from(METERS),
    st.sampled_from(["oct", "oct", "oct", "sep"]),
    st.integers(0, 120_000),  # raw quantity
    st.sampled_from([None, "2026-11-04T00:00:00Z", "2026-10-20T00:00:00Z"]),  # received: on time, late, in Oct
    st.sampled_from(["same", "same", "none", "other", "twice"]),  # the meter's record
    st.sampled_from(["priced", "priced", "off", "none", "two", "credit", "eur", "proration"]),  # the invoice
    st.booleans(),  # the event sent twice
)


def price(units: int) -> str:
    billable = (Decimal(units) / 1000).quantize(Decimal(1), rounding=ROUND_CEILING)
    return str(max(billable - 50, Decimal(0)) * 2 + Decimal("0.00"))


def build(generated):
    raw, meters, lines = [], [], []
    for n, (customer, meter, month, quantity, received, meter_as, invoice_as, twice) in enumerate(generated):
        span = SEP if month == "sep" else ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z")
        day = f"{span[0][:8]}{10 + n % 15:02d}T12:00:00Z"
        if received and month == "oct" and received < day:
            received = None
        raw.append(event(f"e{n}", quantity, timestamp=day, received_at=received, customer=customer, meter=meter))
        if twice:
            raw.append(event(f"e{n}", quantity, timestamp=day, received_at=received, customer=customer, meter=meter))
        units = -(-quantity // 1000)
        if meter_as == "same":
            meters.append(metered(quantity, customer=customer, meter=meter, span=span))
        if meter_as == "other":
            meters.append(metered(quantity + 5000, customer=customer, meter=meter, span=span))
        if meter_as == "twice":  # the meter's quantity in two records
            meters.append(metered(quantity // 2, customer=customer, meter=meter, span=span))
            meters.append(metered(quantity - quantity // 2, customer=customer, meter=meter, span=span))
        ids = {"customer": customer, "meter": meter, "span": span, "line_id": f"il{n}" if n % 3 else f'il "{n}"'}
        if invoice_as in ("priced", "two", "credit", "proration"):
            kind = "proration" if invoice_as == "proration" else "usage"
            lines.append(line(f"{units}.0" if n % 2 else units, price(quantity), kind=kind, **ids))
        if invoice_as == "off":
            lines.append(line(units + 1, price(quantity), **ids))
        if invoice_as == "eur":
            lines.append(line(units, price(quantity), currency="eur", **ids))
        if invoice_as in ("two", "credit"):
            kind = "credit" if invoice_as == "credit" else "usage"
            lines.append(line(0, "-1.00", kind=kind, **{**ids, "line_id": f"il{n}b"}))
    return raw, meters, lines


def reports(folder, period: str, lines_per_page: int = 1_000) -> tuple[RunResult, RunResult]:
    """The book's report stored through the bulk path (its JSON spool checked against the report
    written from the key-by-key path), and the key-by-key report."""
    config = parse_config((folder / "recon.toml").read_text())
    periods = parse_periods(period, config.period.zone)
    sources = SourcePaths(folder / "raw.csv", folder / "metered.csv", folder / "invoiced.csv")
    store = Store.open(f"sqlite:///{folder / 'recon.db'}")
    store.lines_per_page = lines_per_page
    with JsonSpool(folder / "report.json") as spool:
        in_bulk = reconcile_files(config, sources, periods, store, spool=spool)
        assert in_bulk.stored
        spool.deliver()
    key_by_key = reconcile_files(config, sources, periods, None)
    written = io.StringIO()
    write_json(key_by_key.head, key_by_key.texts(), written)
    assert (folder / "report.json").read_text(encoding="utf-8") == written.getvalue()
    return in_bulk, key_by_key


@EXAMPLES
@given(
    st.lists(keys, min_size=1, max_size=30),
    st.sampled_from(["2026-10", "2026-09..2026-10", "2026-08..2026-11"]),
    st.sampled_from([100, 1, 0]),  # evidence ids shown
    st.sampled_from([1_000, 3]),  # lines per stored page
)
def test_a_stored_run_judged_in_bulk_writes_the_lines_the_rules_give(
    tmp_path_factory, generated, period, limit, lines_per_page
):
    folder = tmp_path_factory.mktemp("book")
    write_book(folder, *build(generated), config=config_text() + PLAN + f"\n[evidence]\nlimit = {limit}\n")
    in_bulk, key_by_key = reports(folder, period, lines_per_page)
    assert list(in_bulk.texts()) == list(key_by_key.texts())
    assert in_bulk.head == key_by_key.head


def test_plain_keys_share_a_verdict_and_keep_their_own_ids(tmp_path):
    """Keys of one shape: one verdict, each line with its customer and ids; a customer whose id
    JSON escapes is judged on its own, with the same verdict, in its place in the order."""
    customers = ['cus_"c"', "cus_a", "cus_b"]  # in the report's order
    write_book(
        tmp_path,
        [event(f"e_{c}", 100_000, customer=c) for c in customers],
        [metered(100_000, customer=c) for c in customers],
        [line(100, "100.00", customer=c) for c in customers],
    )
    in_bulk, key_by_key = reports(tmp_path, "2026-10")
    lines = list(in_bulk.lines())
    assert [ln["customer_id"] for ln in lines] == customers
    assert [ln["evidence"]["invoice_line_ids"] for ln in lines] == [
        [f"il_{c}_api_calls_2026-10-01_usage"] for c in customers
    ]
    assert {(ln["class"], ln["delta_amount"]) for ln in lines} == {("match", "0.00")}
    assert list(in_bulk.texts()) == list(key_by_key.texts())


def test_a_key_that_receives_catch_up_is_judged_with_it(tmp_path):
    """An October key that would be plain but for September's late events received in its
    window: the catch-up is its own, and it clears the September timing item."""
    write_book(
        tmp_path,
        [
            event("e_sep", 60_000, timestamp="2026-09-20T12:00:00Z", received_at="2026-10-20T00:00:00Z"),
            event("e_oct", 100_000),
        ],
        [metered(160_000)],
        [line(160, "220.00")],
    )
    in_bulk, key_by_key = reports(tmp_path, "2026-10")
    (only,) = in_bulk.lines()
    assert (only["catchup_units"], only["class"]) == ("60", "match")
    assert only["evidence"]["catchup_event_ids"] == ["e_sep"]
    assert list(in_bulk.texts()) == list(key_by_key.texts())


def test_a_key_metered_in_two_records_is_judged_on_their_sum(tmp_path):
    write_book(
        tmp_path,
        [event("e1", 100_000)],
        [metered(40_000), metered(60_000)],
        [line(100, "100.00")],
    )
    in_bulk, key_by_key = reports(tmp_path, "2026-10")
    (only,) = in_bulk.lines()
    assert (only["metered_units"], only["class"]) == ("100", "match")
    assert list(in_bulk.texts()) == list(key_by_key.texts())


def test_a_database_sources_aggregates_make_the_table_the_files_source_gives(tmp_path):
    """`aggregates_table` (how a database source's aggregates reach the bulk path) gives back
    the aggregates it was given: duplicates, late ids and months before the run survive it."""
    write_book(
        tmp_path,
        [
            event("e1", "1.50", customer="cus_a"),
            event("e1", "1.50", customer="cus_a"),
            event("e2", 7, timestamp="2026-09-20T12:00:00Z", received_at="2026-10-20T00:00:00Z"),
            event("e3", "0.000", received_at="2026-11-04T00:00:00Z", customer='cus_"b"'),
        ],
        [],
        [],
    )
    config = parse_config((tmp_path / "recon.toml").read_text())
    timeline = build_timeline(parse_periods("2026-10", config.period.zone), config.meters, config.period.grace)
    table = RawEventsFile(tmp_path / "raw.csv").aggregate_table(timeline, 100)
    aggregates = raw_aggregates(table)
    assert len(aggregates) == 3
    assert list(map(repr, raw_aggregates(aggregates_table(aggregates)))) == list(map(repr, aggregates))
