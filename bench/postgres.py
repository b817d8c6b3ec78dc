"""Raw events in PostgreSQL: the whole reconciliation against the database's own GROUP BY.

    python bench/generate.py --out bench/data/10m          # once: the 10M-event book
    python bench/postgres.py --data bench/data/10m         # loads it (COPY) the first time

Loads the book's raw events into `<schema>.raw_events` (timestamptz, bigint quantity),
prints the aggregation's query plan (EXPLAIN ANALYZE), then times, alternately and
`--repeat` times each: the floor (a bare `GROUP BY customer_id, meter, month` with
`sum(quantity)`, through psycopg) and the whole reconciliation (`reconcile_files` with
the SQL source: metered and invoiced files read, raw aggregated in the database, three-way
join, classification, the run stored in a fresh SQLite file as `recon reconcile` stores it),
and the SQL source's aggregation alone.
Prints medians and their ratios to the floor. `--index` adds an index on event_id.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import duckdb
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.service import SourcePaths, reconcile_files  # noqa: E402
from bot.store import Store  # noqa: E402
from connectors.sql import RawEventsSQL  # noqa: E402
from rules.config import RawTable, parse_config  # noqa: E402
from rules.periods import parse_periods  # noqa: E402
from rules.timeline import build_timeline  # noqa: E402

COLUMNS = """(event_id text, customer_id text, meter text, "timestamp" timestamptz,
              quantity bigint, received_at timestamptz)"""


def load(url: str, schema: str, data: Path, reload: bool) -> None:
    table = sql.Identifier(schema, "raw_events")
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".raw_events',)).fetchone()[0]
        if exists and not reload:
            return
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        conn.execute(sql.SQL("CREATE TABLE {} " + COLUMNS).format(table))
        with tempfile.TemporaryDirectory() as folder:
            csv_path = Path(folder) / "raw.csv"
            started = time.perf_counter()
            con = duckdb.connect()
            con.execute("SET TimeZone = 'UTC'")
            source = data / "raw_events.parquet"
            con.execute(f"COPY (SELECT * FROM read_parquet('{source}')) TO '{csv_path}' (HEADER false)")
            exported = time.perf_counter()
            with conn.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT csv)").format(table)) as copy:
                with csv_path.open("rb") as handle:
                    while chunk := handle.read(1 << 20):
                        copy.write(chunk)
            copied = time.perf_counter()
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()[0]
        print(
            f"loaded {count:,} rows: DuckDB export {exported - started:.1f} s, COPY {copied - exported:.1f} s, "
            f"VACUUM ANALYZE {time.perf_counter() - copied:.1f} s"
        )


def floor(url: str, schema: str) -> float:
    query = sql.SQL(
        """SELECT customer_id, meter, date_trunc('month', "timestamp"), sum(quantity)
           FROM {} GROUP BY 1, 2, 3"""
    ).format(sql.Identifier(schema, "raw_events"))
    with psycopg.connect(url) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        started = time.perf_counter()
        rows = conn.execute(query).fetchall()
        elapsed = time.perf_counter() - started
    assert len(rows) > 0
    return elapsed


def aggregation(url: str, schema: str, data: Path) -> float:
    """The SQL source's part alone: every statement it runs, and the aggregates back in Python."""
    config = parse_config((data / "recon-parquet.toml").read_text())
    periods = parse_periods("2026-10", config.period.zone)
    timeline = build_timeline(periods, config.meters, config.period.grace)
    source = RawEventsSQL(url, RawTable(name=f"{schema}.raw_events"))
    started = time.perf_counter()
    source.aggregate(timeline, config.evidence_limit, config.period.timezone)
    return time.perf_counter() - started


def whole_run(url: str, schema: str, data: Path) -> tuple[float, int]:
    config = parse_config((data / "recon-parquet.toml").read_text())
    table = RawTable(name=f"{schema}.raw_events")
    config = replace(config, sources=replace(config.sources, raw_table=table))
    periods = parse_periods("2026-10", config.period.zone)
    sources = SourcePaths(url, data / "metered.parquet", data / "invoiced.parquet")
    with tempfile.TemporaryDirectory(prefix="recon-bench-") as folder:
        store = Store.open(f"sqlite:///{Path(folder) / 'recon.db'}")  # stored, as `recon reconcile` does
        started = time.perf_counter()
        result = reconcile_files(config, sources, periods, store)
        seconds = time.perf_counter() - started
        store.close()
    return seconds, result.head["summary"]["keys"]


def explain(url: str, schema: str, data: Path) -> str:
    """EXPLAIN ANALYZE of each statement the SQL source runs for the bench's month."""
    config = parse_config((data / "recon-parquet.toml").read_text())
    periods = parse_periods("2026-10", config.period.zone)
    timeline = build_timeline(periods, config.meters, config.period.grace)
    source = RawEventsSQL(url, RawTable(name=f"{schema}.raw_events"))
    plans = source.plans(timeline, config.evidence_limit, config.period.timezone)
    return "\n".join(f"-- statement {n}\n{plan}" for n, plan in enumerate(plans, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("bench/data/10m"))
    parser.add_argument("--url", default=os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1/test"))
    parser.add_argument("--schema", default="recon_bench")
    parser.add_argument("--reload", action="store_true", help="Load the raw events again.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-explain", action="store_true")
    parser.add_argument("--index", action="store_true", help="Index event_id first (duplicates found from it).")
    args = parser.parse_args()
    load(args.url, args.schema, args.data, args.reload)
    if args.index:
        with psycopg.connect(args.url, autocommit=True) as conn:
            started = time.perf_counter()
            index = sql.SQL("CREATE INDEX IF NOT EXISTS raw_events_event_id ON {} (event_id)")
            conn.execute(index.format(sql.Identifier(args.schema, "raw_events")))
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(args.schema, "raw_events")))
            print(f"index on event_id: {time.perf_counter() - started:.1f} s")
    if not args.no_explain:
        print("query plans of the aggregation's statements (EXPLAIN ANALYZE):")
        print(explain(args.url, args.schema, args.data))
    floors, aggregations, runs = [], [], []
    for i in range(args.repeat):
        floors.append(floor(args.url, args.schema))
        aggregations.append(aggregation(args.url, args.schema, args.data))
        seconds, lines = whole_run(args.url, args.schema, args.data)
        runs.append(seconds)
        print(
            f"round {i + 1}: floor {floors[-1]:.2f} s, SQL source aggregation {aggregations[-1]:.2f} s, "
            f"whole reconciliation {seconds:.2f} s ({lines:,} keys)"
        )
    low, raw, whole = (statistics.median(x) for x in (floors, aggregations, runs))
    print(
        f"medians: floor {low:.2f} s, aggregation {raw:.2f} s ({raw / low:.2f}x), "
        f"whole reconciliation {whole:.2f} s ({whole / low:.2f}x)"
    )


if __name__ == "__main__":
    main()
