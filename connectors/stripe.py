"""Stripe as a billing source: invoice lines, credit notes and Billing Meter usage.

`StripeBilling.invoice_records(invoice_id)` reads one invoice and answers its
customer, its usage period, its lines as `InvoiceLine`s and the meters' aggregates
as `MeteredRecord`s (CONTRACT.md, "From Stripe"). Payloads are read as plain JSON
with `parse_float=Decimal`, so no number ever passes through a float.

Mapping rules
- Customer: the invoice's Stripe customer id (`cus_...`), or, with
  `[stripe] customer_id_from = "metadata.<key>"`, that key of the customer's
  metadata; a customer without the key (or an invoice without a customer) gives
  "", which the core reports as `unmapped`.
- Meter of an invoice line, first match wins: its price id (`pricing.price_details.price`,
  or `price.id` in the pre-basil shape) is a meter's `stripe_price`; that price's
  `recurring.meter` is a meter's `stripe_meter` (the price is retrieved once and
  cached); `metadata.meter` names a configured meter. Otherwise the line keeps the
  price id (or "") as its meter, which maps to nothing: `unmapped`.
- Quantity: `quantity_decimal` when present, else `quantity`, else 0.
- Amount: the line's `amount` (before discounts and tax), from integer minor units
  to major units by the currency's exponent (0 for jpy, 3 for kwd; Stripe keeps
  isk at 2). Currency in lower case.
- Period: the line's `period.start`/`period.end` (Unix seconds) as `[start, end)`:
  a line's end is the next period's start.
- Kind: `proration` when the `parent` branch named by `parent.type`
  (`subscription_item_details` or `invoice_item_details`) has `proration: true`,
  or, in the pre-basil shape, the top-level `proration` is true; else `usage`.
- Credit notes of the invoice (`status: void` ones skipped) give one `credit` line
  per credit-note line: quantity 0, amount = minus its `amount`. It takes the meter
  and period of the invoice line it credits (`invoice_line_item`); else the meter
  named by its own `metadata.meter`, then the credit note's, and the period of
  that meter's lines on the invoice, else the invoice's usage period.
- Usage period of the invoice: the span of its lines mapped to configured meters,
  else of all its lines (catch-up adjustments aside), else the invoice's `period_start`/`period_end`.
- Metered units: for each meter with a `stripe_meter`, and each period of its
  lines (overlapping periods merged, so no usage is counted twice; the invoice's
  usage period when it has no line), the sum of `aggregated_value` of the meter's
  event summaries for the Stripe customer over that period. Stripe wants
  `start_time`/`end_time` on minute boundaries, so both are floored to the minute:
  adjacent periods still tile without gap or overlap, each shifted by under 60 s.
  The record keeps the line's exact period. Meters mapped only by `stripe_price`
  have no metered record: Stripe has no meter to ask; nor has an invoice without
  a customer.

Errors and retries: every Stripe SDK error becomes a `connectors.base` error
carrying Stripe's request id: rate limits, connection failures, 409 and 5xx are
`UpstreamUnavailable`, the rest `UpstreamRejected`; a `Stripe-Should-Retry`
header, when sent, decides instead. The SDK's own retries are off
(`max_network_retries=0`); each request is retried by tenacity on
`UpstreamUnavailable` only, with jittered exponential waits, stopping at
`max_attempts` or before `max_elapsed` seconds, whichever comes first.

Write-back (`connectors.base.WriteBack`): `add_charge` creates an invoice item (on the
invoice's draft when `invoice_id` names one still in draft, else pending for the customer's
next invoice) with `metadata.recon_kind = catch_up`, the meter and the discrepancy's period,
so a later read takes it as an `adjustment` of that key (never as usage, never in a later
period's key). `issue_credit` writes a credit note on a finalized invoice (the part above
what is still due goes to the customer's balance), or a customer balance credit when there
is no finalized invoice. Every write carries the caller's idempotency key, and its
`metadata.recon_key`, by which `find_written` finds it again after a lost answer.

Prices and customers are cached for the life of a `StripeBilling`: build one per
run (or per burst of webhook events) so a changed customer metadata is seen.
Requests carry `Stripe-Version: API_VERSION` whatever the account's default.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import stripe

from connectors.base import (
    ConnectorError,
    InvoiceRecords,
    InvoiceSummary,
    UpstreamRejected,
    UpstreamUnavailable,
    path_segment,
    retrying,
    unexpected_payload,
)
from connectors.pacing import Pace
from rules.config import Config, ConfigError
from rules.models import InvoiceLine, MeteredRecord
from rules.pricing import minor_exponent

log = logging.getLogger(__name__)

API_VERSION = "2026-10-28.endive"  # the version stripe-python 16.1 is generated for
PAGE_SIZE = 100
ZERO = Decimal(0)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Stripe's API keeps ISK as a two-decimal currency (100 = 1 króna), unlike ISO 4217.
_STRIPE_EXPONENTS = {"isk": 2}

Json = dict[str, Any]
Span = tuple[datetime, datetime]
PERIOD_SLACK_BEFORE, PERIOD_SLACK_AFTER = timedelta(days=1), timedelta(days=2)
FIND_SLACK = timedelta(minutes=10)  # our clock against Stripe's, when looking for an earlier write


def make_client(
    api_key: str, api_base: str | None = None, max_network_retries: int = 0, timeout: float = 80
) -> stripe.StripeClient:
    """A client pinned to `API_VERSION`, over `requests`, with the SDK's retries off by default.

    `api_base` (STRIPE_API_BASE) has no `/v1`. Keep `max_network_retries` at 0 when the
    client is handed to `StripeBilling`, which owns the retries.
    """
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base.rstrip("/")} if api_base else None,
        stripe_version=API_VERSION,
        max_network_retries=max_network_retries,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


class StripeBilling:
    """Reads invoices, credit notes and meter event summaries through one `StripeClient`."""

    provider = "stripe"

    def __init__(
        self,
        client: stripe.StripeClient,
        config: Config,
        *,
        customer_id_from: str | None = None,
        max_attempts: int = 5,
        max_elapsed: float = 60,
        wait_initial: float = 0.5,
        wait_max: float = 8,
        pace: Pace | None = None,
    ) -> None:
        """`customer_id_from` defaults to the config's `[stripe] customer_id_from`; `pace`
        keeps every request (each retry too) under the account's rate limit."""
        self._client = client
        self._pace = pace
        self._meters = config.meters
        rule = customer_id_from or config.platforms.get("stripe", {}).get("customer_id_from")
        self._metadata_key = _metadata_key(rule)
        self._by_price = {m.stripe_price: m.name for m in config.meters.values() if m.stripe_price}
        self._by_stripe_meter = {m.stripe_meter: m.name for m in config.meters.values() if m.stripe_meter}
        self._retrying = retrying("stripe", max_attempts, max_elapsed, wait_initial, wait_max)
        self._prices: dict[str, Json] = {}
        self._customers: dict[str, str] = {}

    # -- public API ---------------------------------------------------------------

    def invoice_records(self, invoice_id: str) -> InvoiceRecords:
        """The invoice's customer, usage period, lines (credit notes included) and metered units."""
        with unexpected_payload("Stripe", f"invoice {invoice_id}"):
            records = self._invoice_records(invoice_id)
        log.info(
            "stripe invoice=%s customer=%s lines=%d metered=%d",
            invoice_id,
            records.customer_id,
            len(records.lines),
            len(records.metered),
        )
        return records

    def _invoice_records(self, invoice_id: str) -> InvoiceRecords:
        invoice = self._get(f"/v1/invoices/{path_segment(invoice_id)}")
        stripe_customer = _id_of(invoice.get("customer"))
        customer_id = self.customer_id(stripe_customer)
        pages = self._paginate(f"/v1/invoices/{path_segment(invoice_id)}/lines")
        lines = [self._invoice_line(invoice_id, customer_id, line) for line in pages]
        period = self._usage_period(lines, invoice)
        credits = self._credit_lines(invoice_id, customer_id, lines, period)
        metered = self._metered(stripe_customer, customer_id, lines, period)
        return InvoiceRecords(
            customer_id, period[0], period[1], lines + credits, metered, str(invoice.get("status") or "")
        )

    def hold_draft(self, invoice_id: str, reason: str, run_id: str) -> None:
        """Turn a draft's automatic finalization off, saying why in its metadata (idempotent)."""
        params: Any = {"auto_advance": False, "metadata": {"recon_hold": reason[:500], "recon_run_id": run_id}}
        options: Any = {"idempotency_key": f"recon-hold-{invoice_id}-{run_id}"}
        self._retrying(self._hold_once, invoice_id, params, options)

    # -- write-back -------------------------------------------------------------------

    def add_charge(
        self,
        customer_id: str,
        amount: Decimal,
        currency: str,
        description: str,
        idempotency_key: str,
        *,
        invoice_id: str | None = None,
        meter: str | None = None,
        period: Span | None = None,
    ) -> str:
        """A catch-up invoice item: on `invoice_id` if it is still a draft, else pending."""
        stripe_customer, invoice = self._customer_and_invoice(customer_id, invoice_id)
        params: Any = {
            "customer": stripe_customer,
            "currency": currency.lower(),
            "amount": to_minor_units(amount, currency),
            "description": description[:500],
            "metadata": _recon_metadata("catch_up", idempotency_key, meter),
        }
        if invoice is not None and invoice.get("status") == "draft":
            params["invoice"] = invoice["id"]
        if period is not None:
            params["period"] = {"start": _unix(period[0]), "end": _unix(period[1]) - 1}  # Stripe's end is inclusive
        item = self._retrying(self._create_once, "invoice_items", params, idempotency_key)
        log.info("stripe invoice item %s for %s (%s)", item, stripe_customer, idempotency_key)
        return item

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
    ) -> str:
        """A credit note on a finalized invoice, else a customer balance credit."""
        stripe_customer, invoice = self._customer_and_invoice(customer_id, invoice_id)
        minor = to_minor_units(amount, currency)
        metadata = _recon_metadata("credit", idempotency_key, meter)
        if invoice is not None and invoice.get("status") in ("open", "paid"):
            params: Any = {
                "invoice": invoice["id"],
                "lines": [
                    {"type": "custom_line_item", "description": description[:500], "quantity": 1, "unit_amount": minor}
                ],
                "memo": description[:500],
                "metadata": metadata,
            }
            due = 0 if invoice.get("status") == "paid" else int(invoice.get("amount_remaining") or 0)
            if minor > due:
                params["credit_amount"] = minor - due
            note = self._retrying(self._create_once, "credit_notes", params, idempotency_key)
            log.info("stripe credit note %s on %s (%s)", note, invoice["id"], idempotency_key)
            return note
        params = {
            "amount": -minor,
            "currency": currency.lower(),
            "description": description[:350],
            "metadata": metadata,
        }
        txn = self._retrying(self._create_once, "balance_transactions", params, idempotency_key, stripe_customer)
        log.info("stripe balance credit %s for %s (%s)", txn, stripe_customer, idempotency_key)
        return txn

    def find_written(
        self, kind: str, customer_id: str, invoice_id: str | None, idempotency_key: str, since: datetime
    ) -> str | None:
        """What an earlier `add_charge` (kind `charge`) or `issue_credit` (`credit`) under
        `idempotency_key` created, if it reached Stripe: the customer's invoice items, or credit
        notes and balance transactions, created since a little before `since` (clocks differ),
        whose `metadata.recon_key` is the key (`connectors.base.FindsWritten`)."""
        stripe_customer, _ = self._customer_and_invoice(customer_id, invoice_id)
        created = {"gte": _unix(since - FIND_SLACK)}
        lists: list[tuple[str, dict[str, Any]]] = (
            [("/v1/invoiceitems", {"customer": stripe_customer})]
            if kind == "charge"
            else [
                ("/v1/credit_notes", {"customer": stripe_customer}),
                (f"/v1/customers/{path_segment(stripe_customer)}/balance_transactions", {}),
            ]
        )
        for path, params in lists:
            for found in self._paginate(path, created=created, **params):
                if _metadata(found).get("recon_key") == idempotency_key:
                    log.info("stripe %s %s was written before (%s)", kind, found["id"], idempotency_key)
                    return str(found["id"])
        return None

    def stripe_customer(self, customer_id: str) -> str:
        """The Stripe customer of a product customer id: itself, or by the metadata rule (search)."""
        if self._metadata_key is None:
            return customer_id
        query = f"metadata['{self._metadata_key}']:'{customer_id}'"
        found = self._get("/v1/customers/search", query=query, limit=1)["data"]
        if not found:
            raise UpstreamRejected(f"Stripe: no customer has metadata.{self._metadata_key} = {customer_id!r}")
        return str(found[0]["id"])

    def customer_metadata(self, customer_id: str) -> dict[str, str]:
        """The metadata of a product customer's Stripe customer (the CSM owner map may read it)."""
        customer = self._get(f"/v1/customers/{path_segment(self.stripe_customer(customer_id))}")
        return {str(k): str(v) for k, v in (customer.get("metadata") or {}).items()}

    def _customer_and_invoice(self, customer_id: str, invoice_id: str | None) -> tuple[str, Json | None]:
        if invoice_id:
            invoice = self._get(f"/v1/invoices/{path_segment(invoice_id)}")
            return _id_of(invoice.get("customer")) or self.stripe_customer(customer_id), invoice
        return self.stripe_customer(customer_id), None

    def _create_once(self, service: str, params: Any, idempotency_key: str, parent: str | None = None) -> str:
        self._paced()
        options: Any = {"idempotency_key": idempotency_key}
        v1 = self._client.v1
        try:
            if service == "balance_transactions":
                created = v1.customers.balance_transactions.create(parent or "", params, options)
            else:
                created = getattr(v1, service).create(params, options)
        except stripe.StripeError as exc:
            raise translate_error(exc, f"POST /v1/{service}") from exc
        return str(created.id)

    def customer_id(self, stripe_customer: str) -> str:
        """The product's customer id for a Stripe customer id, by the configured rule."""
        if self._metadata_key is None or not stripe_customer:
            return stripe_customer
        if stripe_customer not in self._customers:
            customer = self._get(f"/v1/customers/{path_segment(stripe_customer)}")
            value = (customer.get("metadata") or {}).get(self._metadata_key)
            self._customers[stripe_customer] = str(value) if value else ""
        return self._customers[stripe_customer]

    def list_recent_invoices(self, created_after: datetime) -> Iterator[InvoiceSummary]:
        """Invoices created strictly after `created_after`, newest first, every page."""
        for invoice in self._paginate("/v1/invoices", created={"gt": _unix(created_after)}):
            with unexpected_payload("Stripe", "invoice list"):
                summary = InvoiceSummary(
                    id=invoice["id"],
                    customer=_id_of(invoice.get("customer")),
                    status=invoice.get("status") or "",
                    created=_instant(invoice["created"]),
                )
            yield summary

    def period_invoices(self, start: datetime, end: datetime) -> Iterator[str]:
        """Invoices created from a day before `start` to two days after `end`: a period's usage
        is invoiced at its end (in arrears), a plan change's proration within it."""
        created = {"gte": _unix(start - PERIOD_SLACK_BEFORE), "lt": _unix(end + PERIOD_SLACK_AFTER)}
        for invoice in self._paginate("/v1/invoices", created=created):
            yield invoice["id"]

    # -- invoice lines --------------------------------------------------------------

    def _invoice_line(self, invoice_id: str, customer_id: str, line: Json) -> InvoiceLine:
        currency = line["currency"].lower()
        return InvoiceLine(
            invoice_id=invoice_id,
            line_id=line["id"],
            customer_id=customer_id,
            meter=self._line_meter(line),
            period_start=_instant(line["period"]["start"]),
            period_end=_instant(line["period"]["end"]),
            quantity=_quantity(line),
            amount=to_major_units(line["amount"], currency),
            currency=currency,
            kind=_line_kind(line),
        )

    def _line_meter(self, line: Json) -> str:
        price_id, embedded = _line_price(line)
        if price_id in self._by_price:
            return self._by_price[price_id]
        if price_id and self._by_stripe_meter:
            price = embedded if embedded is not None else self._price(price_id)
            meter_id = (price.get("recurring") or {}).get("meter")
            if meter_id in self._by_stripe_meter:
                return self._by_stripe_meter[meter_id]
        named = _metadata(line).get("meter")
        if named in self._meters:
            return str(named)
        return price_id

    def _price(self, price_id: str) -> Json:
        if price_id not in self._prices:
            self._prices[price_id] = self._get(f"/v1/prices/{path_segment(price_id)}")
        return self._prices[price_id]

    def _usage_period(self, lines: list[InvoiceLine], invoice: Json) -> Span:
        usage = [ln for ln in lines if ln.kind != "adjustment"]  # a catch-up keeps its own, earlier period
        mapped = [ln for ln in usage if ln.meter in self._meters] or usage
        if not mapped:
            return _instant(invoice["period_start"]), _instant(invoice["period_end"])
        return min(ln.period_start for ln in mapped), max(ln.period_end for ln in mapped)

    # -- credit notes -----------------------------------------------------------------

    def _credit_lines(
        self, invoice_id: str, customer_id: str, lines: list[InvoiceLine], period: Span
    ) -> list[InvoiceLine]:
        credits: list[InvoiceLine] = []
        for note in self._paginate("/v1/credit_notes", invoice=invoice_id):
            if note.get("status") != "void":
                items = self._rest_of(note["lines"])
                credits += [_credit_line(note, item, lines, period, customer_id) for item in items]
        return credits

    # -- metered units ------------------------------------------------------------------

    def _metered(
        self, stripe_customer: str, customer_id: str, lines: list[InvoiceLine], period: Span
    ) -> list[MeteredRecord]:
        if not stripe_customer:
            return []
        records: list[MeteredRecord] = []
        for meter in self._meters.values():
            if not meter.stripe_meter:
                continue
            spans = merge_spans((ln.period_start, ln.period_end) for ln in lines if ln.meter == meter.name)
            for start, end in spans or [period]:
                quantity = self._meter_usage(meter.stripe_meter, stripe_customer, start, end)
                records.append(MeteredRecord(customer_id, meter.name, start, end, quantity))
        return records

    def _meter_usage(self, stripe_meter: str, stripe_customer: str, start: datetime, end: datetime) -> Decimal:
        """The sum of the meter's event summaries over `[start, end)`, floored to minutes."""
        start_time, end_time = _minute_floor(_unix(start)), _minute_floor(_unix(end))
        if start_time >= end_time:
            return ZERO
        summaries = self._paginate(
            f"/v1/billing/meters/{path_segment(stripe_meter)}/event_summaries",
            customer=stripe_customer,
            start_time=start_time,
            end_time=end_time,
        )
        return sum((Decimal(s["aggregated_value"]) for s in summaries), ZERO)

    # -- transport ----------------------------------------------------------------------

    def _paginate(self, path: str, **params: Any) -> Iterator[Json]:
        """Every object of a list endpoint, following `has_more` with `starting_after`."""
        params = {"limit": PAGE_SIZE, **params}
        while True:
            page = self._get(path, **params)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            params["starting_after"] = page["data"][-1]["id"]

    def _rest_of(self, embedded: Json) -> Iterator[Json]:
        """An embedded list's objects, then the ones beyond its first page."""
        yield from embedded["data"]
        if embedded.get("has_more") and embedded["data"]:
            yield from self._paginate(embedded["url"], starting_after=embedded["data"][-1]["id"])

    def _paced(self) -> None:
        if self._pace is not None:
            self._pace.wait()

    def _get(self, path: str, **params: Any) -> Json:
        """One GET, retried on `UpstreamUnavailable`, parsed with decimals."""
        return self._retrying(self._get_once, path, params)

    def _hold_once(self, invoice_id: str, params: Any, options: Any) -> None:
        self._paced()
        try:
            self._client.v1.invoices.update(invoice_id, params, options)
        except stripe.StripeError as exc:
            raise translate_error(exc, f"POST /v1/invoices/{invoice_id}") from exc

    def _get_once(self, path: str, params: dict[str, Any]) -> Json:
        self._paced()
        try:
            response = self._client.raw_request("get", path, **params)
        except stripe.StripeError as exc:
            raise translate_error(exc, f"GET {path}") from exc
        body: Json = json.loads(response.body, parse_float=Decimal)
        return body


# -- errors -------------------------------------------------------------------------


def translate_error(exc: stripe.StripeError, what: str) -> ConnectorError:
    """The `connectors.base` error for a Stripe SDK error, with Stripe's request id."""
    retryable = _should_retry_header(exc)
    if retryable is None:
        retryable = _is_transient(exc)
    kind = UpstreamUnavailable if retryable else UpstreamRejected
    status = f"HTTP {exc.http_status}" if exc.http_status else type(exc).__name__
    return kind(f"Stripe {what}: {status}: {exc.user_message or type(exc).__name__}", request_id=exc.request_id)


def _should_retry_header(exc: stripe.StripeError) -> bool | None:
    for name, value in (exc.headers or {}).items():
        if name.lower() == "stripe-should-retry":
            return str(value).lower() == "true"
    return None


def _is_transient(exc: stripe.StripeError) -> bool:
    """Only these are worth retrying; any other error is taken as final."""
    if isinstance(exc, stripe.RateLimitError):
        return True
    if isinstance(exc, stripe.APIConnectionError):
        return bool(exc.should_retry)
    if isinstance(exc, stripe.APIError):
        return exc.http_status is None or exc.http_status == 409 or exc.http_status >= 500
    return False


# -- payload mapping ----------------------------------------------------------------


def _credit_line(note: Json, item: Json, lines: list[InvoiceLine], period: Span, customer_id: str) -> InvoiceLine:
    """A credit-note line as a `credit` line on the meter and period it reduces."""
    meter, span = _credited(note, item, lines, period)
    currency = note["currency"].lower()
    return InvoiceLine(
        invoice_id=note["invoice"],
        line_id=item["id"],
        customer_id=customer_id,
        meter=meter,
        period_start=span[0],
        period_end=span[1],
        quantity=ZERO,
        amount=-to_major_units(item["amount"], currency),
        currency=currency,
        kind="credit",
    )


def _credited(note: Json, item: Json, lines: list[InvoiceLine], period: Span) -> tuple[str, Span]:
    """The meter and period a credit-note line reduces: its invoice line's, else by metadata."""
    credited = next((ln for ln in lines if ln.line_id == item.get("invoice_line_item")), None)
    if credited is not None:
        return credited.meter, (credited.period_start, credited.period_end)
    meter = str(_metadata(item).get("meter") or _metadata(note).get("meter") or "")
    spans = [(ln.period_start, ln.period_end) for ln in lines if ln.meter == meter]
    if not spans:
        return meter, period
    return meter, (min(s for s, _ in spans), max(e for _, e in spans))


def to_major_units(amount: int, currency: str) -> Decimal:
    """Stripe's integer minor units as a Decimal amount in major units."""
    code = currency.lower()
    return Decimal(amount).scaleb(-_STRIPE_EXPONENTS.get(code, minor_exponent(code)))


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    """The spans in order, overlapping ones merged; adjacent ones stay apart."""
    merged: list[Span] = []
    for start, end in sorted(set(spans)):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _metadata_key(rule: str | None) -> str | None:
    """None for the Stripe customer id itself, else the metadata key to read."""
    if rule in (None, "", "id"):
        return None
    key = rule.removeprefix("metadata.") if isinstance(rule, str) else ""
    if not key or key == rule:
        raise ConfigError(f"stripe.customer_id_from: must be 'id' or 'metadata.<key>' (got {rule!r})")
    return key


def _line_price(line: Json) -> tuple[str, Json | None]:
    """The line's price id, and the price itself when the payload embeds it."""
    pricing = line.get("pricing") or {}
    price = (pricing.get("price_details") or {}).get("price") or line.get("price")
    if isinstance(price, dict):
        return str(price.get("id") or ""), price
    return str(price or ""), None


def _line_kind(line: Json) -> str:
    """`adjustment` for a catch-up charge this product wrote back; else proration or usage."""
    if _metadata(line).get("recon_kind") == "catch_up":
        return "adjustment"
    return "proration" if _is_proration(line) else "usage"


def _recon_metadata(kind: str, idempotency_key: str, meter: str | None) -> dict[str, str]:
    """Marks a write-back as this product's, with the meter it corrects."""
    return {"recon_kind": kind, "recon_key": idempotency_key} | ({"meter": meter} if meter else {})


def to_minor_units(amount: Decimal, currency: str) -> int:
    """A major-unit amount as Stripe's integer minor units (half-up to the currency's exponent)."""
    code = currency.lower()
    exponent = _STRIPE_EXPONENTS.get(code, minor_exponent(code))
    return int(amount.scaleb(exponent).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _is_proration(line: Json) -> bool:
    parent = line.get("parent")
    if parent:
        details = parent.get(parent.get("type") or "") or {}
        return bool(details.get("proration"))
    return bool(line.get("proration"))


def _quantity(line: Json) -> Decimal:
    value = line.get("quantity_decimal")
    if value is None:
        value = line.get("quantity")
    return ZERO if value is None else Decimal(value)


def _metadata(obj: Json) -> Json:
    return obj.get("metadata") or {}


def _id_of(value: str | Json | None) -> str:
    """An expandable field's id, whether Stripe sent the id or the object."""
    if isinstance(value, dict):
        return str(value.get("id") or "")
    return value or ""


def _instant(seconds: int) -> datetime:
    return EPOCH + timedelta(seconds=int(seconds))


def _unix(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(seconds=1)


def _minute_floor(seconds: int) -> int:
    return seconds - seconds % 60
