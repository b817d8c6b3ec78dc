"""Small books for tests: write the three canonical CSV files and a config, reconcile them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from bot.service import SourcePaths, reconcile_files
from bot.store import Store
from connectors.files import INVOICED_COLUMNS, METERED_COLUMNS, RAW_FIELDS
from rules.config import parse_config
from rules.periods import parse_periods

RAW = list(RAW_FIELDS)
METERED = list(METERED_COLUMNS)
INVOICED = list(INVOICED_COLUMNS)

OCT = ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z")
SEP = ("2026-09-01T00:00:00Z", "2026-10-01T00:00:00Z")

CONFIG = """
[period]
timezone = "{timezone}"
grace = "48h"

[[meters]]
name = "api_calls"
unit_size = 1000
rounding = "{rounding}"
included = {included}
unit_price = "2.00"
currency = "usd"
tolerance = {tolerance}
{extra}
"""


def config_text(
    rounding: str = "up", included: int = 50, tolerance: int = 0, timezone: str = "UTC", extra: str = ""
) -> str:
    return CONFIG.format(rounding=rounding, included=included, tolerance=tolerance, timezone=timezone, extra=extra)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[("" if v is None else str(v)) for v in row] for row in rows])
    return path


def event(
    event_id: str,
    quantity: Any,
    timestamp: str = "2026-10-10T12:00:00Z",
    received_at: str | None = None,
    customer: str = "cus_a",
    meter: str = "api_calls",
) -> list[Any]:
    return [event_id, customer, meter, timestamp, quantity, received_at]


def metered(quantity: Any, customer: str = "cus_a", meter: str = "api_calls", span: tuple[str, str] = OCT) -> list[Any]:
    return [customer, meter, span[0], span[1], quantity]


def line(
    quantity: Any,
    amount: str,
    kind: str = "usage",
    customer: str = "cus_a",
    meter: str = "api_calls",
    span: tuple[str, str] = OCT,
    line_id: str | None = None,
    currency: str = "usd",
) -> list[Any]:
    return [
        f"in_{customer}_{span[0][:7]}",
        line_id or f"il_{customer}_{meter}_{span[0][:10]}_{kind}",
        customer,
        meter,
        span[0],
        span[1],
        quantity,
        amount,
        currency,
        kind,
    ]


def write_book(
    folder: Path, raw: list[list[Any]], meters: list[list[Any]], lines: list[list[Any]], config: str | None = None
) -> Path:
    write_csv(folder / "raw.csv", RAW, raw)
    write_csv(folder / "metered.csv", METERED, meters)
    write_csv(folder / "invoiced.csv", INVOICED, lines)
    path = folder / "recon.toml"
    path.write_text(
        '[sources]\nraw = "raw.csv"\nmetered = "metered.csv"\ninvoiced = "invoiced.csv"\n' + (config or config_text())
    )
    return path


def reconcile_book(
    folder: Path, period: str | None = "2026-10", store: Store | None = None, customers: frozenset[str] = frozenset()
) -> dict[str, Any]:
    config = parse_config((folder / "recon.toml").read_text())
    periods = parse_periods(period, config.period.zone) if period else None
    sources = SourcePaths(folder / "raw.csv", folder / "metered.csv", folder / "invoiced.csv")
    return reconcile_files(config, sources, periods, store, customers).report


def run(
    folder: Path,
    raw: list[list[Any]],
    meters: list[list[Any]],
    lines: list[list[Any]],
    config: str | None = None,
    period: str | None = "2026-10",
) -> dict[str, Any]:
    write_book(folder, raw, meters, lines, config)
    return reconcile_book(folder, period)


def only(
    report: dict[str, Any], customer: str = "cus_a", meter: str = "api_calls", period: str | None = None
) -> dict[str, Any]:
    found = [
        ln
        for ln in report["lines"]
        if ln["customer_id"] == customer and ln["meter"] == meter and (period is None or ln["period"] == period)
    ]
    assert len(found) == 1, found
    return found[0]
