"""`recon demo`: a sample book with one case of every class, reconciled end to end.

The book covers September and October 2026. Each customer carries one story:

| customer       | story                                                           | class (period)      |
|----------------|-----------------------------------------------------------------|---------------------|
| cus_acme       | everything agrees, on a flat and a graduated meter              | match               |
| cus_globex     | the metering layer dropped 30,000 calls                         | under_bill (Oct)    |
| cus_wonka      | usage metered, but no invoice line                              | under_bill (Oct)    |
| cus_initech    | five events sent twice, and the meter counted both copies       | over_bill (Oct)     |
| cus_cyberdyne  | the invoice carries 10 units more than the meter                | over_bill (Oct)     |
| cus_umbrella   | 20,000 calls reached the store after September's cutoff         | timing (Sep)        |
|                | and October's invoice carries them (catch-up)                    | match (Oct), clears |
| cus_hooli      | units agree, and a goodwill credit was given                     | credit (Oct)        |
| cus_stark      | plan upgraded on 16 October                                      | proration (Oct)     |
| cus_wayne      | an invoice line for a meter nobody configured                    | unmapped (Oct)      |
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from bot import render
from bot.routing import Outbox, Router, Sent
from bot.service import SourcePaths, reconcile_files
from bot.store import Store
from connectors.files import INVOICED_COLUMNS, METERED_COLUMNS, RAW_FIELDS
from rules.config import parse_config

CONFIG = """\
[sources]
raw = "raw_events.csv"
metered = "metered.csv"
invoiced = "invoiced.csv"

[period]
timezone = "UTC"
grace = "48h"

[[meters]]
name = "api_calls"
unit_size = 1000
rounding = "up"
included = 50
unit_price = "2.00"
currency = "usd"
tolerance = 0

[[meters.plan]]
customer = "cus_stark"
from = "2026-10-16"
included = 80
unit_price = "1.50"

[[meters]]
name = "storage_gb"
unit_size = 1
rounding = "half_up"
included = 100
currency = "usd"
pricing = "graduated"
tiers = [
  { up_to = 1000, unit_price = "0.10" },
  { up_to = "inf", unit_price = "0.05" },
]

[[routes]]
class = "under_bill"
to = "slack:#revops"
min_amount = "10.00"

[[routes]]
class = "over_bill"
to = "ticket:jira"

[[routes]]
class = "over_bill"
to = "slack:@csm"

[[routes]]
class = "timing"
to = "watchlist"

[[routes]]
class = "unmapped"
to = "slack:#billing-ops"

[routing]
digest = "slack:#revops-digest"

[routing.owners]
cus_initech = { slack = "U0CSMANNA", jira = "5b10a2844c20165700ede21g" }
cus_cyberdyne = "U0CSMBOB"
"""

SEP = (datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC))
OCT = (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
STARK_CHANGE = datetime(2026, 10, 16, tzinfo=UTC)


@dataclass
class Book:
    raw: list[list[str]] = field(default_factory=list)
    metered: list[list[str]] = field(default_factory=list)
    invoiced: list[list[str]] = field(default_factory=list)

    def events(
        self,
        customer: str,
        meter: str,
        span: tuple[datetime, datetime],
        total: int,
        count: int,
        *,
        tag: str = "",
        received_late: bool = False,
        repeat: int = 0,
    ) -> None:
        """`count` events adding up to `total`, spread over `span`; `repeat` of them sent twice."""
        start, end = span
        step = (end - start) / count
        for i in range(count):
            when = start + step * i + timedelta(minutes=7)
            received = end + timedelta(days=4) if received_late else when + timedelta(seconds=30)
            quantity = total // count + (total % count if i == count - 1 else 0)
            batch = tag or f"{start:%Y%m}"
            row = [f"{customer}-{meter}-{batch}-{i:03d}", customer, meter, _iso(when), str(quantity), _iso(received)]
            self.raw.append(row)
            if i < repeat:
                self.raw.append([*row[:5], _iso(received + timedelta(minutes=3))])

    def meter(self, customer: str, meter: str, span: tuple[datetime, datetime], quantity: int | str) -> None:
        self.metered.append([customer, meter, _iso(span[0]), _iso(span[1]), str(quantity)])

    def line(
        self,
        customer: str,
        meter: str,
        span: tuple[datetime, datetime],
        quantity: int,
        amount: str,
        kind: str = "usage",
        line_no: int = 1,
    ) -> None:
        invoice = f"in_{customer.removeprefix('cus_')}_{span[0]:%Y%m}"
        self.invoiced.append(
            [
                invoice,
                f"il_{customer.removeprefix('cus_')}_{meter}_{span[0]:%Y%m%d}_{line_no}",
                customer,
                meter,
                _iso(span[0]),
                _iso(span[1]),
                str(quantity),
                amount,
                "usd",
                kind,
            ]
        )


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def sample_book() -> Book:
    book = Book()
    for span, raw, units, amount in ((SEP, 120_000, 120, "140.00"), (OCT, 95_500, 96, "92.00")):
        book.events("cus_acme", "api_calls", span, raw, 24)
        book.meter("cus_acme", "api_calls", span, raw)
        book.line("cus_acme", "api_calls", span, units, amount)
    book.events("cus_acme", "storage_gb", OCT, 1350, 30)
    book.meter("cus_acme", "storage_gb", OCT, 1350)
    book.line("cus_acme", "storage_gb", OCT, 1350, "112.50")

    book.events("cus_globex", "api_calls", OCT, 210_000, 42)
    book.meter("cus_globex", "api_calls", OCT, 180_000)
    book.line("cus_globex", "api_calls", OCT, 180, "260.00")

    book.events("cus_wonka", "api_calls", OCT, 90_000, 18)
    book.meter("cus_wonka", "api_calls", OCT, 90_000)

    book.events("cus_initech", "api_calls", OCT, 150_000, 30, repeat=5)
    book.meter("cus_initech", "api_calls", OCT, 175_000)
    book.line("cus_initech", "api_calls", OCT, 175, "250.00")

    book.events("cus_cyberdyne", "api_calls", OCT, 75_000, 15)
    book.meter("cus_cyberdyne", "api_calls", OCT, 75_000)
    book.line("cus_cyberdyne", "api_calls", OCT, 85, "70.00")

    book.events("cus_umbrella", "api_calls", SEP, 80_000, 16)
    book.events(
        "cus_umbrella", "api_calls", (SEP[1] - timedelta(days=2), SEP[1]), 20_000, 4, tag="late", received_late=True
    )
    book.meter("cus_umbrella", "api_calls", SEP, 80_000)
    book.line("cus_umbrella", "api_calls", SEP, 80, "60.00")
    book.events("cus_umbrella", "api_calls", OCT, 60_000, 12)
    book.meter("cus_umbrella", "api_calls", OCT, 80_000)
    book.line("cus_umbrella", "api_calls", OCT, 80, "60.00")

    book.events("cus_hooli", "api_calls", OCT, 130_000, 26)
    book.meter("cus_hooli", "api_calls", OCT, 130_000)
    book.line("cus_hooli", "api_calls", OCT, 130, "160.00")
    book.line("cus_hooli", "api_calls", OCT, 0, "-25.00", kind="credit", line_no=2)

    before, after = (OCT[0], STARK_CHANGE), (STARK_CHANGE, OCT[1])
    book.events("cus_stark", "api_calls", before, 60_000, 15, tag="pre")
    book.events("cus_stark", "api_calls", after, 90_000, 16, tag="post")
    book.meter("cus_stark", "api_calls", OCT, 150_000)
    book.line("cus_stark", "api_calls", before, 60, "71.61", kind="proration")
    book.line("cus_stark", "api_calls", after, 90, "73.07", line_no=2)

    book.events("cus_wayne", "api_calls", OCT, 40_000, 8)
    book.meter("cus_wayne", "api_calls", OCT, 40_000)
    book.line("cus_wayne", "api_calls", OCT, 40, "0.00")
    book.line("cus_wayne", "sms_legacy", OCT, 400, "4.00", line_no=2)
    return book


def write_book(folder: Path) -> Path:
    """Write the sample book and its config into `folder`; returns the config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    book = sample_book()
    _write_csv(folder / "raw_events.csv", RAW_FIELDS, book.raw)
    _write_csv(folder / "metered.csv", METERED_COLUMNS, book.metered)
    _write_csv(folder / "invoiced.csv", INVOICED_COLUMNS, book.invoiced)
    config = folder / "recon.toml"
    config.write_text(CONFIG, encoding="utf-8")
    return config


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def demo_database(out_dir: Path | None) -> str:
    """The demo's own SQLite file (in `--out`, else here), never RECON_DATABASE_URL: the sample
    customers must not reach a real period's digest or watch-list."""
    return f"sqlite:///{((out_dir or Path.cwd()) / 'recon-demo.db').resolve()}"


def run_demo(out_dir: Path | None, fmt: str) -> None:
    database_url = demo_database(out_dir)
    with tempfile.TemporaryDirectory(prefix="recon-demo-") as scratch:
        folder = out_dir or Path(scratch)
        config_path = write_book(folder)
        config = parse_config(config_path.read_text(encoding="utf-8"))
        sources = SourcePaths(folder / "raw_events.csv", folder / "metered.csv", folder / "invoiced.csv")
        store = Store.open(database_url)
        result = reconcile_files(config, sources, None, store)
    if fmt == "json":
        click.echo(render.as_json(result.report), nl=False)
        return
    console = render.console()
    console.print(f"[bold]overage-recon demo[/]: a sample book of {len(sample_book().raw)} raw events, Sep–Oct 2026")
    render.print_table(result.report, console)
    router = Router(store, config, Outbox(), public_url="https://recon.example.com", dry_run=True)
    print_routing(router.route_run(result.head["run_id"]), console)
    render.print_watchlist(store.watchlist(include_closed=True), console)
    stored = "stored" if result.stored else "already stored (same inputs, nothing new written)"
    console.print(f"Run {result.head['run_id']} {stored} in {database_url} (the demo's own database)")
    if out_dir:
        console.print(f"The sample book is in {out_dir}; try: recon reconcile --config {out_dir / 'recon.toml'}")


def print_routing(sent: list[Sent], console: Console) -> None:
    """What would be posted where (dry run: nothing is sent)."""
    table = Table(title="Routing (dry run: nothing sent)")
    for column in ("to", "would", "key", "message"):
        table.add_column(column, overflow="fold")
    for item in sent:
        table.add_row(item.to, item.what.removeprefix("would "), item.key, item.summary)
    console.print(table)
