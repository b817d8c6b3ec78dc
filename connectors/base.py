"""What every connector shares: its errors and the interfaces the core reads through."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple, Protocol

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


class InvoiceRecords(NamedTuple):
    """What a platform says about one invoice, in the canonical shapes."""

    customer_id: str
    period_start: datetime
    period_end: datetime
    lines: list[InvoiceLine]
    metered: list[MeteredRecord]
    status: str = ""  # the platform's invoice status: draft, open, issued, paid, void...


class InvoiceBilling(Protocol):
    """A billing platform read one invoice at a time (Stripe, Orb, ...), and the one write
    the reconciliation itself may make: holding a draft back from finalizing."""

    def invoice_records(self, invoice_id: str) -> InvoiceRecords: ...

    def hold_draft(self, invoice_id: str, reason: str, run_id: str) -> None: ...


class WriteBack(Protocol):
    """Corrections written back to a billing platform, each under an idempotency key (so a
    retry or a second click writes nothing new). Amounts are positive, in major units.
    Each returns the platform's id of what it wrote."""

    def add_charge(
        self, customer_id: str, amount: Decimal, currency: str, description: str, idempotency_key: str
    ) -> str: ...

    def issue_credit(
        self,
        customer_id: str,
        invoice_id: str | None,
        amount: Decimal,
        currency: str,
        description: str,
        idempotency_key: str,
    ) -> str: ...


class UsageSource(Protocol):
    """Where the product's raw usage events live."""

    def aggregate(self, timeline: Timeline, evidence_limit: int) -> Iterable[RawAggregate]: ...

    def fingerprint(self) -> str: ...


class BillingSource(Protocol):
    """Where the metered units and invoice lines come from."""

    def metered(self) -> Iterable[MeteredRecord]: ...

    def invoiced(self) -> Iterable[InvoiceLine]: ...

    def fingerprint(self) -> str: ...
