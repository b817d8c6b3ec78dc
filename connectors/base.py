"""What every connector shares: its errors and the interfaces the core reads through."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, Protocol, runtime_checkable
from urllib.parse import quote

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from rules.models import InvoiceLine, MeteredRecord, RawAggregate
from rules.timeline import Timeline


class InputError(ValueError):
    """Bad input a user can fix: the message names the file, row and field."""


class ConnectorError(RuntimeError):
    """A source could not be read."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class UpstreamUnavailable(ConnectorError):
    """The platform is down, slow or rate limiting: worth retrying."""


class UpstreamRejected(ConnectorError):
    """The platform refused the request: retrying will not help."""


class NothingToReconcile(UpstreamRejected):
    """The invoice carries no usage to reconcile (a one-off invoice with no line items, say)."""


def retrying(
    platform: str,
    max_attempts: int,
    max_elapsed: float,
    wait_initial: float,
    wait_max: float,
    wait: Callable[[Any], float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Retrying:
    """A platform's one retry layer: `UpstreamUnavailable` retried with jittered exponential
    waits (or `wait`, given the backoff), stopping at `max_attempts` or `max_elapsed` seconds."""
    backoff = wait_random_exponential(multiplier=wait_initial, max=wait_max)
    log = logging.getLogger(f"connectors.{platform}")

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        request_id = getattr(exc, "request_id", None)
        log.warning("%s retry attempt=%d request_id=%s error=%s", platform, state.attempt_number, request_id, exc)

    return Retrying(
        retry=retry_if_exception_type(UpstreamUnavailable),
        stop=stop_after_attempt(max_attempts) | stop_before_delay(max_elapsed),
        wait=wait or backoff,
        before_sleep=log_retry,
        sleep=sleep,
        reraise=True,
    )


@contextmanager
def unexpected_payload(platform: str, what: str) -> Iterator[None]:
    """Turns a payload without the fields a connector reads into a one-line `ConnectorError`."""
    try:
        yield
    except (KeyError, TypeError, ArithmeticError, AttributeError) as exc:
        raise ConnectorError(f"{platform} {what}: unexpected payload ({exc!r})") from exc


def path_segment(identifier: str) -> str:
    """An id as one URL path segment (nothing in it can reach another path)."""
    return quote(identifier, safe="")


class InvoiceRecords(NamedTuple):
    """What a platform says about one invoice, in the canonical shapes."""

    customer_id: str
    period_start: datetime
    period_end: datetime
    lines: list[InvoiceLine]
    metered: list[MeteredRecord]
    status: str = ""  # the platform's invoice status: draft, open, issued, paid, void...


@dataclass(frozen=True)
class InvoiceSummary:
    """An invoice as listed, enough to decide whether to reconcile it."""

    id: str
    customer: str  # the platform's own customer id (Stripe `cus_...`, Orb customer id)
    status: str
    created: datetime


class InvoiceBilling(Protocol):
    """A billing platform (Stripe, Orb, ...) as the worker and the CLI read it: one invoice at
    a time, the invoices that may carry a period's usage, the recent ones for the sweep, and
    the one write the reconciliation itself may make: holding a draft back.

    A third platform is one module that implements these four methods."""

    provider: str

    def invoice_records(self, invoice_id: str) -> InvoiceRecords: ...

    def period_invoices(self, start: datetime, end: datetime) -> Iterator[str]:
        """Ids of every invoice that may hold lines of `[start, end)` (a superset is fine)."""
        ...

    def list_recent_invoices(self, since: datetime) -> Iterator[InvoiceSummary]: ...

    def hold_draft(self, invoice_id: str, reason: str, run_id: str) -> None: ...


def period_records(
    billing: InvoiceBilling, start: datetime, end: datetime, customers: frozenset[str] = frozenset()
) -> tuple[list[MeteredRecord], list[InvoiceLine]]:
    """The metered records and invoice lines of `[start, end)` read invoice by invoice.

    Only records whose own span lies inside the period are kept (CONTRACT: a record belongs
    to the period that contains it), only of `customers` when given; a metered record that
    two invoices both report (same customer, meter and span) counts once.
    """
    metered: dict[tuple[str, str, datetime, datetime], MeteredRecord] = {}
    lines: list[InvoiceLine] = []
    for invoice_id in billing.period_invoices(start, end):
        records = billing.invoice_records(invoice_id)
        if customers and records.customer_id not in customers:
            continue
        lines += [ln for ln in records.lines if _inside(ln.period_start, ln.period_end, start, end)]
        for m in records.metered:
            if _inside(m.period_start, m.period_end, start, end):
                metered.setdefault((m.customer_id, m.meter, m.period_start, m.period_end), m)
    return list(metered.values()), lines


def _inside(span_start: datetime, span_end: datetime, start: datetime, end: datetime) -> bool:
    if span_start == span_end:
        return start <= span_start < end
    return start <= span_start and span_end <= end


class WriteBack(Protocol):
    """Corrections written back to a billing platform, each under an idempotency key (so a
    retry or a second click writes nothing new). Amounts are positive, in major units.
    Each returns the platform's id of what it wrote."""

    def add_charge(
        self,
        customer_id: str,
        amount: Decimal,
        currency: str,
        description: str,
        idempotency_key: str,
        *,
        invoice_id: str | None = None,  # the draft to put it on, when it is still a draft
        meter: str | None = None,  # the key it corrects, kept with the charge so the next
        period: tuple[datetime, datetime] | None = None,  # run reads it as a catch-up, not usage
    ) -> str: ...

    def issue_credit(
        self,
        customer_id: str,
        invoice_id: str | None,
        amount: Decimal,
        currency: str,
        description: str,
        idempotency_key: str,
        *,
        meter: str | None = None,
    ) -> str: ...


@runtime_checkable
class FindsWritten(Protocol):
    """A platform on which a write-back can be looked for by its idempotency key. After a write
    whose answer was lost, the decider looks before writing again: the platform's idempotency
    keys expire, and a retry may not send what the first attempt sent (a draft invoice that
    was finalized since takes a charge differently), which the platform would refuse."""

    def find_written(
        self, kind: str, customer_id: str, invoice_id: str | None, idempotency_key: str, since: datetime
    ) -> str | None:
        """The id of what a write of `kind` (`charge` or `credit`) under `idempotency_key`,
        begun at `since`, created for the customer; None if it created nothing."""
        ...


class UsageSource(Protocol):
    """Where the product's raw usage events live."""

    def aggregate(self, timeline: Timeline, evidence_limit: int) -> Iterable[RawAggregate]: ...

    def fingerprint(self) -> str: ...


class BillingSource(Protocol):
    """Where the metered units and invoice lines come from."""

    def metered(self) -> Iterable[MeteredRecord]: ...

    def invoiced(self) -> Iterable[InvoiceLine]: ...

    def fingerprint(self) -> str: ...
