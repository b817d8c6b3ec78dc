"""Generate a book of any size: raw events, metered aggregates, invoice lines, config.

    python bench/generate.py --customers 100000 --meters 5 --events 10000000 --out bench/data/10m

One month (2026-10, UTC) of events, spread evenly over customer × meter keys.
About 1% of keys carry a break: dropped metering, an invoice quantity above the
meter, a missing invoice line, duplicates, late events. DuckDB writes the files,
so ten million events take seconds; CSV and Parquet hold the same rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import duckdb

START = "2026-10-01 00:00:00+00"
SECONDS = 31 * 86400

CONFIG = """\
[sources]
raw = "raw_events.{ext}"
metered = "metered.{ext}"
invoiced = "invoiced.{ext}"

[period]
timezone = "UTC"
grace = "48h"
{meters}
"""

METER = """
[[meters]]
name = "meter_{n}"
unit_size = 10
rounding = "up"
included = 50
unit_price = "0.02"
currency = "usd"
"""


def generate(out: Path, customers: int, meters: int, events: int, formats: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = customers * meters
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(
        f"""
        CREATE TEMP TABLE raw AS
        SELECT
            'evt_' || i AS event_id,
            'cus_' || lpad(((i % {keys}) // {meters})::VARCHAR, 6, '0') AS customer_id,
            'meter_' || ((i % {keys}) % {meters}) AS meter,
            TIMESTAMPTZ '{START}' + to_seconds((hash(i) % {SECONDS})::BIGINT) AS ts,
            (1 + hash(i * 7) % 100)::VARCHAR AS quantity,
            i % {keys} AS k
        FROM range({events}) t(i)
        """
    )
    # Breaks: every 101st key loses events in metering, every 103rd is over-invoiced,
    # every 107th has no invoice line, every 109th has a duplicated event and every
    # 113th a late one.
    con.execute(
        """
        CREATE TEMP TABLE book AS
        SELECT *, ts + CASE WHEN k % 113 = 0 AND hash(event_id) % 20 = 0
                            THEN INTERVAL 40 DAY ELSE INTERVAL 5 MINUTE END AS received_at
        FROM raw
        UNION ALL
        SELECT *, ts + INTERVAL 10 MINUTE FROM raw WHERE k % 109 = 0 AND hash(event_id) % 20 = 0
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE sums AS
        SELECT customer_id, meter, any_value(k) AS k,
               sum(quantity::DECIMAL(18,0)) FILTER (WHERE received_at <= TIMESTAMPTZ '2026-11-03 00:00:00+00') AS ontime
        FROM (SELECT DISTINCT ON (event_id) * FROM book ORDER BY event_id, received_at)
        GROUP BY customer_id, meter
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE metered AS
        SELECT customer_id, meter, '2026-10-01T00:00:00+00:00' AS period_start,
               '2026-11-01T00:00:00+00:00' AS period_end,
               (CASE WHEN k % 101 = 0 THEN ontime - 40 ELSE ontime END)::VARCHAR AS quantity, k
        FROM sums
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE invoiced AS
        SELECT 'in_' || customer_id AS invoice_id, 'il_' || customer_id || '_' || meter AS line_id,
               customer_id, meter, period_start, period_end, units::VARCHAR AS quantity,
               (greatest(units - 50, 0) * 0.02)::DECIMAL(18,2)::VARCHAR AS amount,
               'usd' AS currency, 'usage' AS kind
        FROM (SELECT *, ceil(quantity::DECIMAL(18,0) / 10) + CASE WHEN k % 103 = 0 THEN 7 ELSE 0 END AS units
              FROM metered WHERE k % 107 <> 0)
        """
    )
    for fmt in formats:
        option = "(FORMAT parquet, COMPRESSION zstd)" if fmt == "parquet" else "(HEADER, DELIMITER ',')"
        ext = "parquet" if fmt == "parquet" else "csv"
        con.execute(
            f"""COPY (SELECT event_id, customer_id, meter, strftime(ts, '%Y-%m-%dT%H:%M:%SZ') AS timestamp,
                        quantity, strftime(received_at, '%Y-%m-%dT%H:%M:%SZ') AS received_at
                     FROM book) TO '{out / f"raw_events.{ext}"}' {option}"""
        )
        con.execute(f"COPY (SELECT * EXCLUDE (k) FROM metered) TO '{out / f'metered.{ext}'}' {option}")
        con.execute(f"COPY invoiced TO '{out / f'invoiced.{ext}'}' {option}")
        meter_blocks = "".join(METER.format(n=n) for n in range(meters))
        (out / f"recon-{ext}.toml").write_text(CONFIG.format(ext=ext, meters=meter_blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--meters", type=int, default=5)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--format", choices=["csv", "parquet", "both"], default="both")
    parser.add_argument("--out", type=Path, default=Path("bench/data/10m"))
    args = parser.parse_args()
    formats = ["csv", "parquet"] if args.format == "both" else [args.format]
    generate(args.out, args.customers, args.meters, args.events, formats)
    print(f"wrote {args.events:,} events for {args.customers * args.meters:,} keys to {args.out}")


if __name__ == "__main__":
    main()
