"""Raw events in PostgreSQL: the same aggregates and reports as the files source.

PostgreSQL is the one at 127.0.0.1:5432 (trust auth, database `test`; CI starts it),
or `TEST_POSTGRES_URL`. The tables live in a schema of their own, dropped afterwards.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

from bot.cli import main
from connectors.base import ConnectorError, InputError
from connectors.files import RawEventsFile
from connectors.raw import is_database, raw_source, resolve
from connectors.sql import Aggregation, RawEventsSQL, _begin, redact
from rules.config import ConfigError, RawTable, parse_config
from rules.models import RawAggregate
from rules.periods import month
from rules.timeline import build_timeline
from tests.book import RAW, config_text, event, line, metered, write_book, write_csv

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent

TYPED = """(event_id text, customer_id text, meter text, "timestamp" timestamptz,
             quantity numeric, received_at timestamptz)"""


@pytest.fixture(scope="session")
def schema() -> Iterator[str]:
    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {redact(POSTGRES_URL)} ({str(exc).strip().splitlines()[0]}): "
            "start it (`pg_ctlcluster 15 main start`; .ci/run does this) or point TEST_POSTGRES_URL at one.",
            pytrace=False,
        )
    name = f"recon_sql_{uuid.uuid4().hex[:10]}"
    conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        conn.execute(f'DROP SCHEMA "{name}" CASCADE')
        conn.close()


def load(schema: str, table: str, rows: list[list], columns: str = TYPED, csv_path: Path | None = None) -> str:
    """A table of raw events (rows in the canonical field order), loaded with COPY."""
    qualified = sql.Identifier(schema, table).as_string()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {qualified} {columns}")
        with conn.cursor().copy(f"COPY {qualified} FROM STDIN (FORMAT csv, HEADER {bool(csv_path)})") as copy:
            if csv_path is not None:
                with csv_path.open("rb") as handle:
                    while chunk := handle.read(1 << 20):
                        copy.write(chunk)
            else:
                text = io.StringIO()
                csv.writer(text).writerows([["" if v is None else v for v in row] for row in rows])
                copy.write(text.getvalue())
        conn.execute(f"ANALYZE {qualified}")
    return f"{schema}.{table}"


def timeline(*months: tuple[int, int]):
    return build_timeline(tuple(month(y, m, ZoneInfo("UTC")) for y, m in months), {}, timedelta(hours=48))


def by_key(aggregates) -> list:
    return sorted(
        aggregates, key=lambda a: (a.customer_id, a.meter, -1 if a.segment is None else a.segment, a.receiving or -1)
    )


ODD_ROWS = [
    event("e1", "1.5"),
    event("e2", "2.25", customer="cus_b"),
    event("e3", "0.000000000001"),
    # the same event twice, received twice: counted once
    event("dup", 7, received_at="2026-10-10T12:05:00Z"),
    event("dup", 7, received_at="2026-10-10T12:09:00Z"),
    # copies that disagree on quantity: the first received is kept
    event("clash", 3, received_at="2026-10-11T00:10:00Z"),
    event("clash", 5, received_at="2026-10-11T00:01:00Z"),
    # late: October events received after the window closed
    *[
        event(f"late{i:02d}", 1, timestamp="2026-10-30T00:00:00Z", received_at="2026-11-20T00:00:00Z")
        for i in range(12)
    ],
    # September events received in October's window: catch-up
    event("sep1", 10, timestamp="2026-09-29T00:00:00Z", received_at="2026-10-05T00:00:00Z"),
    event("sep2", 20, timestamp="2026-08-31T23:00:00Z", received_at="2026-10-06T00:00:00Z"),
    # outside the run: ignored
    event("dec", 100, timestamp="2026-12-05T00:00:00Z"),
    event("Zeta", 1, customer="cus_c", meter="storage_gb"),
    event("alpha", 1, customer="cus_c", meter="storage_gb", received_at="2026-12-01T00:00:00Z"),
    event("_under", 1, customer="cus_c", meter="storage_gb", received_at="2026-12-01T00:00:00Z"),
]


def test_sql_aggregates_equal_the_files_aggregates(schema, tmp_path):
    name = load(schema, "odd_events", ODD_ROWS)
    path = write_csv(tmp_path / "raw.csv", RAW, ODD_ROWS)
    source = RawEventsSQL(POSTGRES_URL, RawTable(name=name))
    for grid in (timeline((2026, 10)), timeline((2026, 10), (2026, 11))):
        for limit in (0, 3, 100):
            for customers in (frozenset(), frozenset({"cus_a"})):
                expected = RawEventsFile(path).aggregate(grid, limit, customers=customers)
                assert by_key(source.aggregate(grid, limit, customers=customers)) == by_key(expected)
    assert source.fingerprint().startswith("sql:")


COPY_ROWS = [
    # the kept copy is cus_a's; the dropped one is cus_d's only row: cus_d has no aggregate
    event("moved", 4, received_at="2026-10-10T12:05:00Z"),
    event("moved", 4, customer="cus_d", received_at="2026-10-10T12:07:00Z"),
    # received on time first, then again after the window closed: not a late event
    event("relayed", 2, timestamp="2026-10-20T00:00:00Z", received_at="2026-10-20T00:01:00Z"),
    event("relayed", 2, timestamp="2026-10-20T00:00:00Z", received_at="2026-11-20T00:00:00Z"),
    # late events of one key, one of them twice: each list shows its own ids up to the limit
    event("late_a", 1, timestamp="2026-10-30T00:00:00Z", received_at="2026-11-20T00:00:00Z"),
    event("late_b", 1, timestamp="2026-10-30T00:00:00Z", received_at="2026-11-20T00:00:00Z"),
    event("late_b", 1, timestamp="2026-10-30T00:00:00Z", received_at="2026-11-21T00:00:00Z"),
    # a catch-up event sent twice with different timestamps: only the kept copy's month is its origin
    event("caught", 10, timestamp="2026-09-29T00:00:00Z", received_at="2026-10-05T00:00:00Z"),
    event("caught", 10, timestamp="2026-07-31T23:00:00Z", received_at="2026-10-06T00:00:00Z"),
    # three copies, two quantities: two dropped, one conflict
    event("thrice", 5, received_at="2026-10-12T00:00:00Z"),
    event("thrice", 6, received_at="2026-10-12T00:01:00Z"),
    event("thrice", 5, received_at="2026-10-12T00:02:00Z"),
]


def test_copies_are_taken_off_the_keys_they_fell_in(schema, tmp_path, monkeypatch):
    """Copies counted once wherever they landed, with the files' result; again when every id
    shares its hash with others (the copies are found by exact id among them)."""
    rows = [*ODD_ROWS, *COPY_ROWS]
    source = RawEventsSQL(POSTGRES_URL, RawTable(name=load(schema, "copy_events", rows)))
    path = write_csv(tmp_path / "raw.csv", RAW, rows)
    grids = (timeline((2026, 10)), timeline((2026, 10), (2026, 11)))
    expected = [by_key(RawEventsFile(path).aggregate(grid, limit)) for grid in grids for limit in (0, 1, 100)]
    assert [by_key(source.aggregate(grid, limit)) for grid in grids for limit in (0, 1, 100)] == expected
    assert not [a for a in expected[2] if a.customer_id == "cus_d"]
    monkeypatch.setattr(Aggregation, "id_key", lambda self, event_id: sa.func.length(event_id))
    assert [by_key(source.aggregate(grid, limit)) for grid in grids for limit in (0, 1, 100)] == expected


def test_the_copies_are_looked_for_in_the_snapshot_the_sums_read(schema):
    """The second connection imports the first one's snapshot: a row added in between is seen
    by neither."""
    name = load(schema, "snap_events", [event("e1", 1)])
    source = RawEventsSQL(POSTGRES_URL, RawTable(name=name))
    count = sa.select(sa.func.count()).select_from(sa.table("snap_events", schema=schema))
    with source.engine.connect() as conn:
        _begin(conn, postgres=True)
        snapshot = conn.execute(sa.select(sa.func.pg_export_snapshot())).scalar_one()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as other:
            other.execute(
                sql.SQL("INSERT INTO {} VALUES ('e2', 'cus_a', 'api_calls', now(), 1, NULL)").format(
                    sql.Identifier(schema, "snap_events")
                )
            )
        assert source._on_snapshot(snapshot, lambda second: second.execute(count).scalar_one()) == 1
    with source.engine.connect() as conn:
        assert conn.execute(count).scalar_one() == 2


def test_a_table_keyed_by_event_id_gives_the_same_aggregates(schema, tmp_path):
    """With a primary key on event_id no copies can exist, and none are looked for."""
    rows = [r for r in ODD_ROWS if r[0] not in ("dup", "clash")]
    keyed = TYPED.replace("event_id text,", "event_id text PRIMARY KEY,")
    source = RawEventsSQL(POSTGRES_URL, RawTable(name=load(schema, "keyed_events", rows, keyed)))
    expected = RawEventsFile(write_csv(tmp_path / "raw.csv", RAW, rows)).aggregate(timeline((2026, 10)), 5)
    with source.engine.connect() as conn:
        assert source._unique_ids(conn)
    assert by_key(source.aggregate(timeline((2026, 10)), 5)) == by_key(expected)


def test_same_rows_same_fingerprint_and_a_change_changes_it(schema):
    first = RawEventsSQL(POSTGRES_URL, RawTable(name=load(schema, "fp_a", ODD_ROWS)))
    second = RawEventsSQL(POSTGRES_URL, RawTable(name=load(schema, "fp_b", [*ODD_ROWS, event("new", 1)])))
    grid = timeline((2026, 10))
    with pytest.raises(ConnectorError, match="fingerprint\\(\\) before aggregate\\(\\): nothing read yet"):
        first.fingerprint()
    first.aggregate(grid, 10)
    second.aggregate(grid, 10)
    assert first.fingerprint() != second.fingerprint()
    assert first.fingerprint() == first.fingerprint()  # worked out on the first call, then kept
    again = RawEventsSQL(POSTGRES_URL, RawTable(name=f"{schema}.fp_a"))
    again.aggregate(grid, 10)
    assert again.fingerprint() == first.fingerprint()


def test_config_names_are_quoted_not_pasted(schema):
    """Odd table and column names work, and a name that tries to end the statement is just a name."""
    columns = """("Event Id" text, "cust;omer" text, "Meter""s" text, "when" timestamp,
                  qty bigint, "received" timestamp)"""
    rows = [
        ["a", "cus_a", "api_calls", "2026-10-01 00:00:00", 5, None],
        ["b", "cus_a", "api_calls", "2026-10-02", 6, ""],
    ]
    name = load(schema, 'Usage "Events"', rows, columns)
    table = parse_config(
        f"""[sources.raw_table]
name = '{name}'
event_id = "Event Id"
customer_id = "cust;omer"
meter = 'Meter"s'
timestamp = "when"
quantity = "qty"
received_at = "received"
"""
    ).sources.raw_table
    (aggregate,) = RawEventsSQL(POSTGRES_URL, table).aggregate(timeline((2026, 10)), 10)
    assert (aggregate.customer_id, aggregate.quantity, aggregate.events) == ("cus_a", 11, 2)
    hostile = RawTable(name=f"{schema}.odd_events; DROP SCHEMA {schema} CASCADE")
    with pytest.raises(InputError, match="no such table"):
        RawEventsSQL(POSTGRES_URL, hostile).aggregate(timeline((2026, 10)), 10)


def test_a_float_or_text_quantity_is_summed_as_an_exact_decimal(schema):
    rows = [["f1", "cus_a", "api_calls", "2026-10-01T00:00:00Z", "0.1", None]] * 1 + [
        ["f2", "cus_a", "api_calls", "2026-10-01T00:00:00Z", "0.2", None]
    ]
    for kind in ("double precision", "text"):
        columns = TYPED.replace("quantity numeric", f"quantity {kind}")
        name = load(schema, f"q_{kind.split()[0]}", rows, columns)
        (aggregate,) = RawEventsSQL(POSTGRES_URL, RawTable(name=name)).aggregate(timeline((2026, 10)), 10)
        assert str(aggregate.quantity) == "0.3"


def test_a_text_quantity_that_is_no_number_is_a_one_line_input_error(schema):
    columns = TYPED.replace("quantity numeric", "quantity text")
    name = load(schema, "text_qty", [event("e1", "1"), event("e2", "12,5")], columns)
    with pytest.raises(InputError, match=r"table .*text_qty: invalid input syntax for type numeric: \"12,5\""):
        RawEventsSQL(POSTGRES_URL, RawTable(name=name)).aggregate(timeline((2026, 10)), 10)


def test_a_bad_row_is_one_line_naming_table_event_and_column(schema):
    rows = [event("e1", 1), event("e2", None), event("", 1, customer="cus_z")]
    url = POSTGRES_URL.replace("postgres@", "postgres:s3cret@")
    name = load(schema, "bad_events", rows)
    with pytest.raises(InputError) as caught:
        RawEventsSQL(url, RawTable(name=name)).aggregate(timeline((2026, 10)), 10)
    message = str(caught.value)
    assert message.endswith(f"table {name}: a row of customer_id 'cus_z': event_id: is empty")
    assert "s3cret" not in message and "***" in message
    with pytest.raises(InputError, match="event_id: is empty"):  # with no evidence ids to show either
        RawEventsSQL(POSTGRES_URL, RawTable(name=name)).aggregate(timeline((2026, 10)), 0)
    with pytest.raises(InputError, match=r"missing column 'qty' \(sources.raw_table.quantity\)"):
        columns = dict(RawTable().columns) | {"quantity": "qty"}
        RawEventsSQL(POSTGRES_URL, RawTable(name=name, columns=tuple(columns.items()))).aggregate(
            timeline((2026, 10)), 10
        )


def test_same_report_from_postgresql_as_from_files(schema, tmp_path):
    """A generated book of a few hundred thousand events: duplicates, late events and breaks."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from generate import generate
    finally:
        sys.path.remove(str(ROOT / "bench"))
    generate(tmp_path, customers=2_000, meters=3, events=300_000, formats=["csv"])
    name = load(schema, "book_events", [], TYPED, csv_path=tmp_path / "raw_events.csv")
    files_config = tmp_path / "recon-csv.toml"
    sql_config = tmp_path / "recon-sql.toml"
    text = files_config.read_text()
    sql_config.write_text(
        text.replace('raw = "raw_events.csv"', 'raw = "env:RAW_DATABASE_URL"')
        + f'\n[sources.raw_table]\nname = "{name}"\n'
    )
    runner = CliRunner()
    env = {"RAW_DATABASE_URL": POSTGRES_URL}
    args = ["reconcile", "--format", "json", "--period", "2026-10"]
    from_files = runner.invoke(main, [*args, "--config", str(files_config)], catch_exceptions=False)
    from_sql = runner.invoke(main, [*args, "--config", str(sql_config)], env=env, catch_exceptions=False)
    with_flag = runner.invoke(
        main, [*args, "--config", str(files_config), "--raw", POSTGRES_URL], catch_exceptions=False
    )
    assert from_files.exit_code == from_sql.exit_code == 0, from_sql.stderr
    files_report, sql_report = json.loads(from_files.stdout), json.loads(from_sql.stdout)
    assert sql_report["lines"] == files_report["lines"]
    assert sql_report["summary"] == files_report["summary"]
    assert len(files_report["lines"]) == 6_000
    classes = {ln["class"] for ln in files_report["lines"]}
    assert {"match", "under_bill", "over_bill"} <= classes
    assert any(ln["evidence"]["duplicate_event_ids"] for ln in files_report["lines"])
    assert any(ln["evidence"]["late_event_ids"] for ln in files_report["lines"])
    # --raw with a URL reads the default table name, which this schema does not hold
    assert with_flag.exit_code == 2
    assert "table usage_events: no such table" in with_flag.stderr


def test_raw_sources_are_told_apart():
    assert is_database("postgresql://u@h/db") and is_database("snowflake://acct/db") and is_database("env:X")
    assert not is_database("events/*.parquet") and not is_database("s3://bucket/raw/*.parquet")
    assert resolve("s3://bucket/x.parquet", Path("/cfg")) == "s3://bucket/x.parquet"
    assert resolve("raw/*.csv", Path("/cfg")) == Path("/cfg/raw/*.csv")
    assert isinstance(raw_source(POSTGRES_URL, Path(".")), RawEventsSQL)
    with pytest.raises(InputError, match="environment variable NOPE_URL is not set"):
        raw_source("env:NOPE_URL", Path("."))


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[sources.raw_table]\ncolour = "x"', "sources.raw_table.colour: unknown key"),
        ('[sources.raw_table]\nname = "a.b.c"', "sources.raw_table.name: must be 'table' or 'schema.table'"),
        ('[sources.raw_table]\nname = ".b"', "sources.raw_table.name: must be 'table' or 'schema.table'"),
        ("[sources.raw_table]\nquantity = 3", "sources.raw_table.quantity: must be a non-empty string"),
    ],
)
def test_raw_table_config_errors_name_the_key(toml, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(toml)


def test_cli_with_a_database_book(schema, tmp_path):
    name = load(schema, "cli_events", [event("e1", 100_000), event("e2", 30_000)])
    config = write_book(tmp_path, [], [metered(100_000)], [line(100, "100.00")], config_text())
    text = config.read_text().replace('raw = "raw.csv"', f'raw = "{POSTGRES_URL}"')
    config.write_text(text + f'\n[sources.raw_table]\nname = "{name}"\n')
    result = CliRunner().invoke(
        main, ["reconcile", "--config", str(config), "--format", "json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.stderr
    assert [line["class"] for line in json.loads(result.stdout)["lines"]] == ["under_bill"]


def test_the_query_plans_show_the_aggregation_in_the_database(schema):
    source = RawEventsSQL(POSTGRES_URL, RawTable(name=load(schema, "plan_events", ODD_ROWS)))
    plans = source.plans(timeline((2026, 10)), 10)
    assert len(plans) == 3  # per-key sums, duplicate ids, copies and late ids
    assert all("Scan on plan_events" in plan and "Aggregate" in plan for plan in plans)


@given(
    st.text(max_size=8),
    st.text(max_size=8),
    st.one_of(st.none(), st.integers(0, 9)),
    st.one_of(st.none(), st.integers(0, 9)),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.integers(0, 10**9),
    st.lists(st.text(max_size=5), max_size=2).map(tuple),
    st.integers(0, 5),
)
def test_the_digest_reads_each_aggregate_as_its_repr(customer, meter, segment, receiving, quantity, events, ids, n):
    from connectors.sql import _shown

    aggregate = RawAggregate(customer, meter, segment, receiving, quantity, events, ids, ids[::-1], n, n, ids)
    assert _shown(aggregate) == repr(aggregate)
    sums = (customer, meter, segment, receiving, quantity, events)  # a key with nothing to correct
    assert _shown(sums) == repr(RawAggregate(*sums))
