"""A reconciliation run end to end: connectors → rules → store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.store import RunRecord, Store
from connectors.base import InvoiceBilling, period_records
from connectors.files import Columns, FileBilling, RawEventsFile, raw_aggregates
from connectors.raw import RawSource, raw_source
from rules.config import Config
from rules.match import Joined, add_raw, join_billing
from rules.models import InvoiceLine, MeteredRecord, Period, RawAggregate, Report
from rules.periods import infer_periods, label_for
from rules.reconcile import CALCULATION_VERSION, judge_all, reconcile, run_id_for, without_cyclic_gc
from rules.report import (
    LineWriter,
    StoredLine,
    StoredPages,
    head_json,
    parse_line,
    report_head,
    report_json,
    stored_lines,
)
from rules.timeline import Timeline, build_timeline

if TYPE_CHECKING:  # the CLI makes the spool; the worker's runs never load the report writers
    import pyarrow as pa

    from bot.render import JsonSpool


@dataclass(frozen=True)
class SourcePaths:
    raw: Path | str  # a path, a pattern, or a database URL
    metered: Path
    invoiced: Path


@dataclass(frozen=True)
class RunResult:
    """A run's report: `head` (run id, period, summary) and its lines, one at a time.

    With a store the lines are read back as stored, so what is printed is what was kept, and
    the verdicts are let go once saved; without one, they are made from `verdicts`.
    `report` is the whole document in memory."""

    head: dict[str, Any]
    store: Store | None
    stored: bool = False  # this call stored the run (False: it was stored already, or no store)
    verdicts: Report | None = None

    def texts(self, breaks_only: bool = False) -> Iterator[str]:
        """Each line's compact JSON text (as `rules.report.line_text` writes it); `breaks_only`:
        the lines that are not matches."""
        if self.verdicts is not None:
            lines = self.verdicts.lines
            return map(LineWriter(), (ln for ln in lines if ln.klass != "match") if breaks_only else lines)
        assert self.store is not None
        return self.store.line_texts(self.head["run_id"], breaks_only=breaks_only)

    def blocks(self) -> Iterator[str]:
        """Every line's text, in blocks of consecutive lines joined by newlines (the store's pages;
        without a store, a line each), for writers that take a block at a time."""
        if self.verdicts is not None:
            return self.texts()
        assert self.store is not None
        return self.store.line_blocks(self.head["run_id"])

    def lines(self, breaks_only: bool = False) -> Iterator[dict[str, Any]]:
        return map(parse_line, self.texts(breaks_only))

    @property
    def report(self) -> dict[str, Any]:
        return {**self.head, "lines": list(self.lines())}


def reconcile_files(
    config: Config,
    sources: SourcePaths,
    periods: tuple[Period, ...] | None,
    store: Store | None,
    customers: frozenset[str] = frozenset(),
    progress: Callable[..., Any] | None = None,
    spool: JsonSpool | None = None,
) -> RunResult:
    """Reconcile the three files over `periods` (by default, the periods the records name);
    store the run unless it is stored already. `spool` is written the JSON report as the run
    is stored (it is left incomplete when the run was stored already)."""
    raw = raw_source(sources.raw, Path("."), config)
    billing = FileBilling(sources.metered, sources.invoiced)
    # A stored run of the whole book judges its plain keys in bulk (bot.bulk); the raw
    # aggregates then stay an Arrow table, the billing side columns.
    bulk = store is not None and not customers
    aggregate = _aggregate_table if bulk else _aggregate
    with without_cyclic_gc(), ThreadPoolExecutor(max_workers=2) as pool:
        # Hashing the files overlaps with DuckDB's scan instead of adding to it; with the periods
        # given, the scan itself overlaps with reading the billing side. A database source's
        # fingerprint is the digest of what aggregate() read, so it is taken after it.
        early = isinstance(raw, RawEventsFile)
        hashed = pool.submit(lambda: {"raw": raw.fingerprint() if early else "", "billing": billing.fingerprint()})
        scan = pool.submit(aggregate, config, raw, periods, progress) if periods is not None else None

        def fingerprints() -> dict[str, str]:
            return hashed.result() | ({} if early else {"raw": raw.fingerprint()})

        columns = billing.columns() if bulk else None
        if columns is not None:
            assert store is not None
            if periods is None or scan is None:
                periods = infer_periods(_column_spans(*columns), config.period.zone)
                scan = pool.submit(aggregate, config, raw, periods, progress)
            return _reconcile_in_bulk(config, scan.result(), columns, periods, fingerprints, store, spool)
        # Not in bulk, or a doubtful billing value: the records are read field by field (which names it).
        records = Records(list(billing.metered()), list(billing.invoiced()))
        if periods is None or scan is None:
            spans = {(r.period_start, r.period_end) for r in (*records.metered, *records.lines)}
            periods = infer_periods(spans, config.period.zone)
            scan = pool.submit(aggregate, config, raw, periods, progress)
        # The billing side is grouped by key while the raw events are still being scanned.
        billed = _join_billing(config, records, periods, customers)
        aggregates = (lambda: raw_aggregates(scan.result())) if aggregate is _aggregate_table else scan.result
        return _reconcile(config, aggregates, billed, periods, fingerprints, store, customers, spool)


def _column_spans(metered: Columns, invoiced: Columns) -> set[tuple[datetime, datetime]]:
    """The distinct (period_start, period_end) of the billing side's rows."""
    return {
        (columns.distinct["period_start"][s], columns.distinct["period_end"][e])
        for columns in (metered, invoiced)
        for s, e in columns.spans()
    }


def _reconcile_in_bulk(
    config: Config,
    aggregates: pa.Table,
    columns: tuple[Columns, Columns],
    periods: tuple[Period, ...],
    fingerprints: Callable[[], dict[str, str]],
    store: Store,
    spool: JsonSpool | None,
) -> RunResult:
    """`_reconcile` with the plain keys judged in bulk (`bot.bulk`). The inputs' fingerprints
    (a database source's digest of what it read) are taken beside the judging, which does
    not need the run's id."""
    from bot.bulk import judge_book

    timeline = build_timeline(periods, config.meters, config.period.grace)
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(fingerprints)
        judged = judge_book(config, timeline, aggregates, *columns, store.lines_per_page)
    inputs = hashing.result()
    run_id = run_id_for(config.fingerprint, inputs, periods, frozenset())
    head = head_json(run_id, periods, judged.summary)
    return _store(store, head, judged.pages, config, inputs, periods, frozenset(), spool)


def reconcile_platform(
    config: Config,
    raw_spec: Path | str,
    billing: InvoiceBilling,
    periods: tuple[Period, ...],
    store: Store | None,
    customers: frozenset[str] = frozenset(),
    progress: Callable[..., Any] | None = None,
    spool: JsonSpool | None = None,
) -> RunResult:
    """Reconcile raw events (files or a database) against a platform's metered units and invoice
    lines for `periods`, read invoice by invoice through the platform's API (`period_records`);
    `spool` as in `reconcile_files`."""
    raw = raw_source(raw_spec, Path("."), config)
    metered: list[MeteredRecord] = []
    lines: list[InvoiceLine] = []
    for period in periods:
        found = period_records(billing, period.start, period.end, customers)
        metered += found[0]
        lines += found[1]
    digest = hashlib.sha256(repr((sorted(map(repr, metered)), sorted(map(repr, lines)))).encode()).hexdigest()

    def fingerprints() -> dict[str, str]:
        return {"raw": raw.fingerprint(), "billing": f"{billing.provider}:{digest}"}

    with without_cyclic_gc():
        billed = _join_billing(config, Records(metered, lines), periods, customers)
        aggregates = _aggregate(config, raw, periods, progress)
        return _reconcile(config, lambda: aggregates, billed, periods, fingerprints, store, customers, spool)


@dataclass
class Records:
    """The billing side's records, handed over to `_join_billing`, which lets go of each
    once it is read (the caller keeps no other reference)."""

    metered: list[MeteredRecord]
    lines: list[InvoiceLine]


def _join_billing(config: Config, records: Records, periods: tuple[Period, ...], customers: frozenset[str]) -> Joined:
    timeline = build_timeline(periods, config.meters, config.period.grace)
    return join_billing(timeline, _drain(records.metered), _drain(records.lines), customers)


def _reconcile(
    config: Config,
    aggregates: Callable[[], list[RawAggregate]],
    billed: Joined,
    periods: tuple[Period, ...],
    fingerprints: Callable[[], dict[str, str]],
    store: Store | None,
    customers: frozenset[str],
    spool: JsonSpool | None,
) -> RunResult:
    """The raw aggregates (`aggregates()` waits for a scan under way) joined with the billing
    side's keys, judged, and stored (and written to `spool` as they are stored)."""
    timeline = build_timeline(periods, config.meters, config.period.grace)
    joined = add_raw(billed, timeline, _drain(aggregates()), customers)
    inputs = fingerprints()
    run_id = run_id_for(config.fingerprint, inputs, periods, customers)
    report, joined = judge_all(config, timeline, joined, run_id, customers)
    head = report_head(report, _scope(joined))
    if store is None:
        return RunResult(head=head, store=None, verdicts=report)
    return _store(store, head, stored_lines(report), config, inputs, periods, customers, spool)


def _store(
    store: Store,
    head: dict[str, Any],
    lines: Iterable[StoredLine] | StoredPages,
    config: Config,
    inputs: dict[str, str],
    periods: tuple[Period, ...],
    customers: frozenset[str],
    spool: JsonSpool | None,
) -> RunResult:
    """The run stored (unless it was already), and written to `spool` as it is."""
    seen = None
    if spool is not None:
        spool.begin(head)
        seen = spool.page
    stored = save(store, head, lines, config, inputs, periods, customers, seen=seen)
    if stored and spool is not None:
        spool.finish()
    return RunResult(head=head, store=store, stored=stored)


def _aggregate(
    config: Config, raw: RawSource, periods: tuple[Period, ...], progress: Callable[..., Any] | None
) -> list[RawAggregate]:
    return raw.aggregate(*_scan_args(config, periods), progress)


def _aggregate_table(
    config: Config, raw: RawSource, periods: tuple[Period, ...], progress: Callable[..., Any] | None
) -> pa.Table:
    return raw.aggregate_table(*_scan_args(config, periods), progress)


def _scan_args(config: Config, periods: tuple[Period, ...]) -> tuple[Timeline, int, str]:
    timeline = build_timeline(periods, config.meters, config.period.grace)
    return timeline, config.evidence_limit, config.period.timezone


def _drain(items: list[Any]) -> Iterator[Any]:
    """The items in order, each removed from `items` as it is given."""
    items.reverse()
    while items:
        yield items.pop()


def event_run_id(provider: str, event_id: str) -> str:
    """One run per processed event, the same id however often the event is retried."""
    return "run_" + hashlib.sha256(f"{provider}:{event_id}".encode()).hexdigest()[:20]


def reconcile_invoice(
    config: Config,
    billing: InvoiceBilling,
    raw: RawSource,
    store: Store,
    invoice_id: str,
    run_id: str,
    provider: str = "stripe",
) -> str:
    """Reconcile an invoice's customer over the invoice's period and every configured meter.

    The run is recorded as `running` first; a run cut short is redone under the same id,
    and a run already done is left as it is.
    """
    records = billing.invoice_records(invoice_id)
    zone = config.period.zone
    period = Period(records.period_start, records.period_end, label_for(records.period_start, records.period_end, zone))
    customers = frozenset({records.customer_id})
    record = RunRecord(
        run_id=run_id,
        period_start=period.start.isoformat(),
        period_end=period.end.isoformat(),
        period_label=period.label,
        config_hash=config.fingerprint,
        calculation_version=CALCULATION_VERSION,
        inputs={"invoice": invoice_id},
        customers=sorted(customers),
        invoice_id=invoice_id,
        customer_id=records.customer_id,
    )
    if store.start_run(record) == "done":
        return run_id
    timeline = build_timeline((period,), config.meters, config.period.grace)
    aggregates = raw.aggregate(timeline, config.evidence_limit, config.period.timezone, customers=customers)
    record = replace(record, inputs={"invoice": invoice_id, "raw": raw.fingerprint()})
    report, joined = reconcile(
        config,
        timeline,
        aggregates,
        records.metered,
        records.lines,
        run_id,
        customers,
        every_meter=bool(records.customer_id),
    )
    document = report_json(report, _scope(joined))
    store.save_run(record, document["summary"], stored_lines(report))
    store.recheck_watchlist(run_id, config.period.escalate_after)
    if records.status == "draft":
        hold_if_material(config.platforms.get(provider, {}), billing, invoice_id, run_id, document["lines"])
    return run_id


MATERIAL = ("under_bill", "over_bill", "unmapped")


def hold_if_material(
    rules: dict[str, Any], billing: InvoiceBilling, invoice_id: str, run_id: str, lines: list[dict[str, Any]]
) -> bool:
    """With `hold_drafts` on, stop a draft with a material break from finalizing until someone decides."""
    if not rules.get("hold_drafts"):
        return False
    floor = rules.get("hold_min_amount", Decimal(0))
    breaks = [ln for ln in lines if ln["class"] in MATERIAL and abs(Decimal(ln["delta_amount"])) >= floor]
    if not breaks:
        return False
    reason = "; ".join(f"{ln['meter']}: {ln['class']} {ln['delta_amount']} {ln['currency']}" for ln in breaks)
    billing.hold_draft(invoice_id, f"overage-recon run {run_id}: {reason}", run_id)
    return True


def _scope(joined: Joined) -> dict[str, Any]:
    return {"out_of_scope": {"metered": joined.out_of_scope_metered, "invoice_lines": joined.out_of_scope_lines}}


def save(
    store: Store,
    head: dict[str, Any],
    lines: Iterable[StoredLine] | StoredPages,
    config: Config,
    inputs: dict[str, str],
    periods: tuple[Period, ...],
    customers: frozenset[str],
    invoice_id: str | None = None,
    seen: Callable[[bytes], object] | None = None,
) -> bool:
    # A run's lines are all of its periods: the store reads a period's lines only from runs so
    # labelled (bot.store._RUNS_OF_PERIOD).
    label = periods[0].label if len(periods) == 1 else f"{periods[0].label}..{periods[-1].label}"
    record = RunRecord(
        run_id=head["run_id"],
        period_start=head["period"]["start"],
        period_end=head["period"]["end"],
        period_label=label,
        config_hash=config.fingerprint,
        calculation_version=CALCULATION_VERSION,
        inputs=inputs,
        customers=sorted(customers),
        invoice_id=invoice_id,
        customer_id=next(iter(customers)) if len(customers) == 1 else None,
    )
    stored = store.save_run(record, head["summary"], lines, seen)
    store.recheck_watchlist(record.run_id, config.period.escalate_after)
    return stored
