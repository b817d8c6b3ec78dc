"""A reconciliation run end to end: connectors → rules → store."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.store import RunRecord, Store
from connectors.files import FileBilling, RawEventsFile
from rules.config import Config
from rules.models import Period
from rules.periods import infer_periods
from rules.reconcile import CALCULATION_VERSION, reconcile, run_id_for
from rules.report import report_json
from rules.timeline import build_timeline


@dataclass(frozen=True)
class SourcePaths:
    raw: Path
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
    raw = RawEventsFile(sources.raw)
    billing = FileBilling(sources.metered, sources.invoiced)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Hashing the inputs overlaps with DuckDB's scan instead of adding to it.
        fingerprints = pool.submit(lambda: {"raw": raw.fingerprint(), "billing": billing.fingerprint()})
        metered, lines = list(billing.metered()), list(billing.invoiced())
        if periods is None:
            spans = {(r.period_start, r.period_end) for r in (*metered, *lines)}
            periods = infer_periods(spans, config.period.zone)
        timeline = build_timeline(periods, config.meters, config.period.grace)
        aggregates = raw.aggregate(timeline, config.evidence_limit, config.period.timezone, progress)
        run_id = run_id_for(config.fingerprint, fingerprints.result(), periods, customers)
    report, joined = reconcile(config, timeline, aggregates, metered, lines, run_id, customers)
    document = report_json(
        report,
        {"out_of_scope": {"metered": joined.out_of_scope_metered, "invoice_lines": joined.out_of_scope_lines}},
    )
    stored = False
    if store is not None:
        stored = save(store, document, config, fingerprints.result(), periods, customers)
    return RunResult(report=document, stored=stored)


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
