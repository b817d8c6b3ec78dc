"""A reconciliation run end to end: connectors → rules → store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from bot.store import RunRecord, Store
from connectors.base import InvoiceBilling
from connectors.files import FileBilling, RawEventsFile
from connectors.raw import RawSource, raw_source
from rules.config import Config
from rules.match import Joined
from rules.models import Period
from rules.periods import infer_periods, label_for
from rules.reconcile import CALCULATION_VERSION, reconcile, run_id_for
from rules.report import report_json
from rules.timeline import build_timeline


@dataclass(frozen=True)
class SourcePaths:
    raw: Path | str  # a path, a pattern, or a database URL
    metered: Path
    invoiced: Path


@dataclass(frozen=True)
class RunResult:
    report: dict[str, Any]
    stored: bool


def reconcile_files(
    config: Config,
    sources: SourcePaths,
    periods: tuple[Period, ...] | None,
    store: Store | None,
    customers: frozenset[str] = frozenset(),
    progress: Callable[..., Any] | None = None,
) -> RunResult:
    """Reconcile the three files over `periods` (by default, the periods the records name);
    store the run unless it is stored already."""
    raw = raw_source(sources.raw, Path("."), config)
    billing = FileBilling(sources.metered, sources.invoiced)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Hashing the files overlaps with DuckDB's scan; a database source's fingerprint is
        # the digest of what aggregate() read, so it is taken after it.
        early = isinstance(raw, RawEventsFile)
        fingerprints = pool.submit(
            lambda: {"raw": raw.fingerprint() if early else "", "billing": billing.fingerprint()}
        )
        metered, lines = list(billing.metered()), list(billing.invoiced())
        if periods is None:
            spans = {(r.period_start, r.period_end) for r in (*metered, *lines)}
            periods = infer_periods(spans, config.period.zone)
        timeline = build_timeline(periods, config.meters, config.period.grace)
        aggregates = raw.aggregate(timeline, config.evidence_limit, config.period.timezone, progress)
        inputs = fingerprints.result() | ({} if early else {"raw": raw.fingerprint()})
        run_id = run_id_for(config.fingerprint, inputs, periods, customers)
    report, joined = reconcile(config, timeline, aggregates, metered, lines, run_id, customers)
    document = report_json(report, _scope(joined))
    stored = False
    if store is not None:
        stored = save(store, document, config, inputs, periods, customers)
    return RunResult(report=document, stored=stored)


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
    store.save_run(record, document["summary"], document["lines"])
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
    document: dict[str, Any],
    config: Config,
    inputs: dict[str, str],
    periods: tuple[Period, ...],
    customers: frozenset[str],
    invoice_id: str | None = None,
) -> bool:
    label = periods[0].label if len(periods) == 1 else f"{periods[0].label}..{periods[-1].label}"
    record = RunRecord(
        run_id=document["run_id"],
        period_start=document["period"]["start"],
        period_end=document["period"]["end"],
        period_label=label,
        config_hash=config.fingerprint,
        calculation_version=CALCULATION_VERSION,
        inputs=inputs,
        customers=sorted(customers),
        invoice_id=invoice_id,
        customer_id=next(iter(customers)) if len(customers) == 1 else None,
    )
    return store.save_run(record, document["summary"], document["lines"])
