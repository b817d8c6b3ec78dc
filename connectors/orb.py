"""Orb as a billing source: invoice line items, credit notes and subscription usage; and writes.

`OrbBilling.invoice_records(invoice_id)` reads one invoice (`GET /invoices/{id}`,
line items embedded) and answers its customer, usage period, lines as
`InvoiceLine`s and the subscription's usage as `MeteredRecord`s (CONTRACT.md,
"From Orb"). Responses are parsed with `parse_float=Decimal`: Orb's amounts are
decimal strings and its quantities JSON numbers, and neither passes through a float.

Why `requests` and not the `orb-billing` SDK for the API: the SDK's models hand
quantities out as floats (the contract forbids adding them as floats), and its
httpx transport cannot be faked at the HTTP boundary with `responses` as every
other connector here is. The requests are the SDK's own (paths, query names,
`status[]` arrays, bearer key, `Idempotency-Key`); `ORB_API_BASE` is the SDK's
`base_url`, `/v1` included.

Mapping rules
- Customer: the invoice's `customer.external_customer_id` (the product's id by
  default); `[orb] customer_id_from = "id"` takes Orb's customer id instead, and
  `"metadata.<key>"` that key of the Orb customer's metadata (read once per
  customer). A customer without one gives "", which the core reports as `unmapped`.
- Meter of a line item, first match wins: its price (`price.id` or
  `price.external_price_id`) is a meter's `orb_price`; its `price.billable_metric.id`
  is a meter's `orb_metric`; its `price.item.id` is a meter's `orb_item`. Otherwise
  the line keeps its billable metric id (or price id) as its meter: `unmapped`.
  A fixed-fee line (`price.price_type = fixed_price`) that maps to no meter is not
  usage and is left out.
- Quantity: the sum of the line's `sub_line_items` quantities when it has any (the
  tiers of a tiered price, the cells of a matrix price, the groups of a grouped
  price: every group of the metric counts to its meter), else the line's `quantity`.
- Amount: the line's `subtotal` (the price of its units before adjustments and
  credits); currency in lower case.
- Period: `[start_date, end_date)`. The invoice's usage period is the span of its
  lines mapped to configured meters (else of all its lines), never `invoice_date`.
- Kind: `proration` for a line shorter than the usage period beside another line
  of the same meter (a mid-period plan change); else `usage`.
- Reductions, each its own line on the meter and period of the line it reduces,
  quantity 0: every discount adjustment (`usage_discount`, `amount_discount`,
  `percentage_discount`, `tiered_percentage_discount`) and `credits_applied` are
  `credit` lines of minus their amount; a `minimum` is an `adjustment` that adds
  and a `maximum` one that subtracts. Each credit note of the invoice that is not
  voided (`GET /credit_notes/{id}`) gives a `credit` line per line item, on the
  meter and period of the invoice line with the same item (else the meter whose
  `orb_item` it is, over the usage period). Invoice-level discounts and minimums
  are not per meter and are left out (compare per-price subtotals).
- Metered units: for each configured meter whose billable metric is known (its
  `orb_metric`, else the metric of the price its lines map through) and each span
  of its lines (overlaps merged; the usage period when it has no line), the sum of
  the metric's `usage[].quantity` from `GET /subscriptions/{id}/usage` with
  `view_mode=periodic` over exactly that `[timeframe_start, timeframe_end)`. An
  invoice without a subscription (one-off) has no metered record.

Writes (`WriteBack`): `add_charge` adds a one-off line (`POST /invoice_line_items`)
to the customer's newest draft invoice in that currency, and is refused when there
is none (Orb adds lines only to drafts); `issue_credit` increments the customer's
balance (`POST /customers/{id}/balance_transactions`, applied to their next
invoices), naming the invoice in its description. Both send `Idempotency-Key`
(hashed to 64 characters when longer, Orb's limit). `hold_draft` cannot stop Orb
from issuing a draft (Orb has no `auto_advance`): it writes the reason into the
draft's metadata (`recon_hold`, `recon_run_id`) and logs a warning that says so.

Errors and retries: 408, 409, 429, 5xx and connection failures are
`UpstreamUnavailable` and retried by tenacity with jittered exponential waits (a
`Retry-After` of up to `max_wait_retry_after` seconds is waited instead), stopping at
`max_attempts` or before `max_elapsed` seconds; any other status is `UpstreamRejected`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import requests
from tenacity import (
    RetryCallState,
    wait_random_exponential,
)

from connectors.base import (
    ConnectorError,
    InvoiceRecords,
    InvoiceSummary,
    NothingToReconcile,
    UpstreamRejected,
    UpstreamUnavailable,
    path_segment,
    retrying,
    unexpected_payload,
)
from connectors.pacing import Pace
from connectors.stripe import merge_spans
from rules.config import Config, ConfigError
from rules.models import InvoiceLine, MeteredRecord
from rules.values import parse_instant

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.withorb.com/v1"
PAGE_SIZE = 100  # the spec's maximum `limit`
ZERO = Decimal(0)
RETRYABLE_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
DISCOUNTS = ("usage_discount", "amount_discount", "percentage_discount", "tiered_percentage_discount")
LISTED_STATUSES = ("draft", "issued", "paid", "synced")
PERIOD_SLACK_BEFORE, PERIOD_SLACK_AFTER = timedelta(days=1), timedelta(days=2)
MAX_IDEMPOTENCY_KEY = 64

Json = dict[str, Any]
Span = tuple[datetime, datetime]


class RetryLater(UpstreamUnavailable):
    """Orb asked us to wait (`Retry-After`) before trying again."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OrbBilling:
    """Reads invoices, credit notes and subscription usage from Orb's API; writes corrections."""

    provider = "orb"

    def __init__(
        self,
        config: Config,
        api_key: str,
        api_base: str | None = None,
        *,
        session: requests.Session | None = None,
        customer_id_from: str | None = None,
        timeout: float = 60,
        max_attempts: int = 5,
        max_elapsed: float = 60,
        wait_initial: float = 0.5,
        wait_max: float = 8,
        max_wait_retry_after: float = 60,
        sleep: Callable[[float], None] = time.sleep,
        pace: Pace | None = None,
    ) -> None:
        """`customer_id_from` defaults to the config's `[orb] customer_id_from`; `pace` keeps
        every request (each retry too) under the account's rate limit."""
        self._pace = pace
        self._base = (api_base or DEFAULT_API_BASE).rstrip("/")
        self._session = session or requests.Session()
        self._session.headers.update({"Authorization": f"Bearer {api_key}", "Accept": "application/json"})
        self._timeout = timeout
        self._meters = config.meters
        rule = customer_id_from or config.platforms.get("orb", {}).get("customer_id_from")
        self._identity, self._metadata_key = customer_rule(rule)
        self._by_price = {m.orb_price: m.name for m in config.meters.values() if m.orb_price}
        self._by_metric = {m.orb_metric: m.name for m in config.meters.values() if m.orb_metric}
        self._by_item = {m.orb_item: m.name for m in config.meters.values() if m.orb_item}
        backoff = wait_random_exponential(multiplier=wait_initial, max=wait_max)
        wait = _honour_retry_after(backoff, max_wait_retry_after)
        self._retrying = retrying("orb", max_attempts, max_elapsed, wait_initial, wait_max, wait, sleep)
        self._customers: dict[str, str] = {}

    # -- reading ------------------------------------------------------------------------

    def invoice_records(self, invoice_id: str) -> InvoiceRecords:
        """The invoice's customer, usage period, lines (reductions included) and metered units."""
        with unexpected_payload("Orb", f"invoice {invoice_id}"):
            records = self._invoice_records(invoice_id)
        log.info(
            "orb invoice=%s customer=%s lines=%d metered=%d",
            invoice_id,
            records.customer_id,
            len(records.lines),
            len(records.metered),
        )
        return records

    def period_invoices(self, start: datetime, end: datetime) -> Iterator[str]:
        """Invoices dated from a day before `start` to two days after `end` (usage is invoiced
        at the period's end in the customer's time zone; a plan change's within it), drafts too."""
        params = {
            "invoice_date[gte]": _iso(start - PERIOD_SLACK_BEFORE),
            "invoice_date[lt]": _iso(end + PERIOD_SLACK_AFTER),
            "status[]": list(LISTED_STATUSES),
        }
        for invoice in self._paginate("/invoices", params):
            yield invoice["id"]

    def list_recent_invoices(self, since: datetime) -> Iterator[InvoiceSummary]:
        """Invoices dated after `since` and by now, drafts too, newest first, every page.

        A draft dated in the future is the current period's, still filling: not yet."""
        params = {"invoice_date[gt]": _iso(since), "status[]": list(LISTED_STATUSES)}
        now = datetime.now(UTC)
        for invoice in self._paginate("/invoices", params):
            with unexpected_payload("Orb", "invoice list"):
                if _instant(invoice["invoice_date"]) > now:
                    continue
                yield InvoiceSummary(
                    id=invoice["id"],
                    customer=str((invoice.get("customer") or {}).get("id") or ""),
                    status=str(invoice.get("status") or ""),
                    created=_instant(invoice.get("created_at") or invoice["invoice_date"]),
                )

    def customer_id(self, customer: Json) -> str:
        """The product's customer id for an invoice's `customer{id, external_customer_id}`."""
        orb_id = str(customer.get("id") or "")
        if self._identity == "external":
            return str(customer.get("external_customer_id") or "")
        if self._identity == "id" or not orb_id:
            return orb_id
        if orb_id not in self._customers:
            found = self._get(f"/customers/{path_segment(orb_id)}")
            value = (found.get("metadata") or {}).get(self._metadata_key)
            self._customers[orb_id] = str(value) if value else ""
        return self._customers[orb_id]

    def _invoice_records(self, invoice_id: str) -> InvoiceRecords:
        invoice = self._get(f"/invoices/{path_segment(invoice_id)}")
        customer_id = self.customer_id(invoice.get("customer") or {})
        currency = str(invoice["currency"]).lower()
        items = [item for item in invoice["line_items"] if self._counts(item)]
        if not items and not invoice["line_items"]:
            raise NothingToReconcile(f"Orb invoice {invoice_id}: no line items to date a usage period")
        period = self._usage_period(items or invoice["line_items"])
        lines: list[InvoiceLine] = []
        for item in items:
            line = self._line(invoice_id, customer_id, currency, item, items, period)
            lines += [line, *_reductions(item, line)]
        lines += self._credit_note_lines(invoice, customer_id, currency, items, lines, period)
        subscription = (invoice.get("subscription") or {}).get("id")
        metered = self._metered(subscription, customer_id, items, lines, period) if subscription else []
        return InvoiceRecords(customer_id, period[0], period[1], lines, metered, str(invoice.get("status") or ""))

    # -- line items -----------------------------------------------------------------------

    def meter_of(self, price: Json) -> str:
        """The configured meter a price maps to, or its metric (or price) id: `unmapped`."""
        for key in (price.get("id"), price.get("external_price_id")):
            if key and key in self._by_price:
                return self._by_price[key]
        metric = (price.get("billable_metric") or {}).get("id")
        if metric in self._by_metric:
            return self._by_metric[metric]
        item = (price.get("item") or {}).get("id")
        if item in self._by_item:
            return self._by_item[item]
        return str(metric or price.get("id") or "")

    def _counts(self, item: Json) -> bool:
        """Usage lines always; a fixed fee only when a meter is configured for it."""
        price = item["price"]
        return price.get("price_type") != "fixed_price" or self.meter_of(price) in self._meters

    def _line(
        self, invoice_id: str, customer_id: str, currency: str, item: Json, items: list[Json], period: Span
    ) -> InvoiceLine:
        meter = self.meter_of(item["price"])
        start, end = _instant(item["start_date"]), _instant(item["end_date"])
        siblings = [i for i in items if i is not item and self.meter_of(i["price"]) == meter]
        partial = (start, end) != period and (period[0] <= start and end <= period[1])
        return InvoiceLine(
            invoice_id=invoice_id,
            line_id=item["id"],
            customer_id=customer_id,
            meter=meter,
            period_start=start,
            period_end=end,
            quantity=_quantity(item),
            amount=Decimal(item["subtotal"]),
            currency=currency,
            kind="proration" if partial and siblings else "usage",
        )

    def _usage_period(self, items: list[Json]) -> Span:
        mapped = [i for i in items if self.meter_of(i["price"]) in self._meters] or items
        return min(_instant(i["start_date"]) for i in mapped), max(_instant(i["end_date"]) for i in mapped)

    # -- credit notes -------------------------------------------------------------------------

    def _credit_note_lines(
        self,
        invoice: Json,
        customer_id: str,
        currency: str,
        items: list[Json],
        lines: list[InvoiceLine],
        period: Span,
    ) -> list[InvoiceLine]:
        by_line = {ln.line_id: ln for ln in lines}
        by_item = {(i["price"].get("item") or {}).get("id"): by_line[i["id"]] for i in items if i["id"] in by_line}
        credits: list[InvoiceLine] = []
        for summary in invoice.get("credit_notes") or []:
            if summary.get("voided_at"):
                continue
            note = self._get(f"/credit_notes/{path_segment(summary['id'])}")
            if note.get("voided_at"):
                continue
            for entry in note["line_items"]:
                credited = by_item.get(entry.get("item_id"))
                meter = credited.meter if credited else self._by_item.get(entry.get("item_id"), "")
                span = (credited.period_start, credited.period_end) if credited else period
                credits.append(
                    InvoiceLine(
                        invoice_id=invoice["id"],
                        line_id=entry["id"],
                        customer_id=customer_id,
                        meter=meter,
                        period_start=span[0],
                        period_end=span[1],
                        quantity=ZERO,
                        amount=-abs(Decimal(entry["amount"])),
                        currency=currency,
                        kind="credit",
                    )
                )
        return credits

    # -- metered units --------------------------------------------------------------------------

    def _metered(
        self, subscription: str, customer_id: str, items: list[Json], lines: list[InvoiceLine], period: Span
    ) -> list[MeteredRecord]:
        usage_by_span: dict[Span, dict[str, Decimal]] = {}
        records: list[MeteredRecord] = []
        for meter in self._meters.values():
            metric = meter.orb_metric or next(
                (
                    (i["price"].get("billable_metric") or {}).get("id")
                    for i in items
                    if self.meter_of(i["price"]) == meter.name and (i["price"].get("billable_metric") or {}).get("id")
                ),
                None,
            )
            if not metric:
                continue
            usage = [ln for ln in lines if ln.meter == meter.name and ln.kind in ("usage", "proration")]
            for span in merge_spans((ln.period_start, ln.period_end) for ln in usage) or [period]:
                if span not in usage_by_span:
                    usage_by_span[span] = self._usage(subscription, *span)
                quantity = usage_by_span[span].get(metric, ZERO)
                records.append(MeteredRecord(customer_id, meter.name, span[0], span[1], quantity))
        return records

    def _usage(self, subscription: str, start: datetime, end: datetime) -> dict[str, Decimal]:
        """Each billable metric's usage over `[start, end)`, summed exactly from daily windows."""
        body = self._get(
            f"/subscriptions/{path_segment(subscription)}/usage",
            {"timeframe_start": _iso(start), "timeframe_end": _iso(end), "view_mode": "periodic"},
        )
        totals: dict[str, Decimal] = {}
        for entry in body["data"]:
            metric = entry["billable_metric"]["id"]
            total = sum((Decimal(w["quantity"]) for w in entry["usage"]), ZERO)
            totals[metric] = totals.get(metric, ZERO) + total
        return totals

    # -- writes ------------------------------------------------------------------------------------

    def hold_draft(self, invoice_id: str, reason: str, run_id: str) -> None:
        """Orb has no switch that stops a draft from issuing: mark the draft, and say so."""
        body = {"metadata": {"recon_hold": reason[:500], "recon_run_id": run_id}}
        self._send("PUT", f"/invoices/{path_segment(invoice_id)}", body, f"recon-hold-{invoice_id}-{run_id}")
        log.warning(
            "orb invoice %s: marked recon_hold in its metadata; Orb cannot hold a draft, it will issue on schedule",
            invoice_id,
        )

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
        period: tuple[datetime, datetime] | None = None,
    ) -> str:
        """A one-off line on the customer's newest draft invoice in `currency`; its line item id.

        Orb invoices are issued once their period closes, so the reconciled `invoice_id` is not
        a draft any more; the one-off line has no billable metric, so later runs do not read it
        as usage of `meter` (the description names the key it corrects)."""
        draft = self._draft_invoice(customer_id, currency)
        day = _instant(draft["invoice_date"]).date().isoformat()
        body = {
            "invoice_id": draft["id"],
            "amount": str(amount),
            "quantity": 1,
            "start_date": day,
            "end_date": day,
            "name": description,
        }
        created = self._send("POST", "/invoice_line_items", body, idempotency_key)
        return str(created["id"])

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
        """A customer balance increment (applied to their next invoices); its transaction id."""
        if invoice_id:
            orb_customer = str(self._get(f"/invoices/{path_segment(invoice_id)}")["customer"]["id"])
            description = f"{description} (invoice {invoice_id})"
        else:
            orb_customer = self._orb_customer(customer_id)
        body = {"amount": str(abs(amount)), "type": "increment", "description": description}
        created = self._send(
            "POST", f"/customers/{path_segment(orb_customer)}/balance_transactions", body, idempotency_key
        )
        return str(created["id"])

    def _draft_invoice(self, customer_id: str, currency: str) -> Json:
        params = {**self._customer_filter(customer_id), "status[]": ["draft"]}
        for invoice in self._paginate("/invoices", params):
            if str(invoice.get("currency") or "").lower() == currency.lower():
                return invoice
        raise UpstreamRejected(
            f"Orb customer {customer_id}: no draft invoice in {currency.lower()} to add a charge to "
            "(Orb adds one-off lines only to drafts)"
        )

    def _orb_customer(self, customer_id: str) -> str:
        if self._identity == "id":
            return customer_id
        found = self._get(f"/customers/external_customer_id/{path_segment(customer_id)}")
        return str(found["id"])

    def _customer_filter(self, customer_id: str) -> dict[str, str]:
        if self._identity == "external":
            return {"external_customer_id": customer_id}
        if self._identity == "id":
            return {"customer_id": customer_id}
        raise UpstreamRejected(
            f"orb.customer_id_from = metadata.{self._metadata_key}: cannot find the Orb customer of "
            f"{customer_id!r} to write to (use external_customer_id or id)"
        )

    # -- transport ------------------------------------------------------------------------------------

    def _paginate(self, path: str, params: dict[str, Any]) -> Iterator[Json]:
        """Every object of a list endpoint, following `pagination_metadata.next_cursor`."""
        params = {"limit": PAGE_SIZE, **params}
        while True:
            page = self._get(path, params)
            yield from page["data"]
            meta = page.get("pagination_metadata") or {}
            if not meta.get("has_more") or not meta.get("next_cursor"):
                return
            params = {**params, "cursor": meta["next_cursor"]}

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Json:
        return self._retrying(self._once, "GET", path, params, None, None)

    def _send(self, method: str, path: str, body: Json, idempotency_key: str) -> Json:
        """A write, retried under one idempotency key, so Orb applies it once."""
        return self._retrying(self._once, method, path, None, body, _idempotency_key(idempotency_key))

    def _once(
        self, method: str, path: str, params: dict[str, Any] | None, body: Json | None, idempotency_key: str | None
    ) -> Json:
        what = f"{method} {path}"
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if self._pace is not None:
            self._pace.wait()
        try:
            response = self._session.request(
                method, self._base + path, params=params, json=body, headers=headers, timeout=self._timeout
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise UpstreamUnavailable(f"Orb {what}: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise _error(response, what)
        try:
            parsed: Json = json.loads(response.text, parse_float=Decimal)
        except ValueError as exc:
            raise ConnectorError(f"Orb {what}: the response is not JSON") from exc
        return parsed


# -- errors and retries -------------------------------------------------------------------------


def _error(response: requests.Response, what: str) -> ConnectorError:
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            detail = str(body.get("detail") or body.get("title") or "")
    except ValueError:
        pass
    message = f"Orb {what}: HTTP {response.status_code}" + (f": {detail}" if detail else "")
    if response.status_code not in RETRYABLE_STATUSES:
        return UpstreamRejected(message)
    return RetryLater(message, _retry_after(response.headers.get("Retry-After")))


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None  # float ok: seconds to wait, not money
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
    return seconds if seconds is not None and seconds >= 0 else None


def _honour_retry_after(
    backoff: Callable[[RetryCallState], float], ceiling: float
) -> Callable[[RetryCallState], float]:
    """Orb's `Retry-After` when it sent one we can wait (up to `ceiling`), else our backoff."""

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None)
        if asked is not None and asked <= ceiling:
            return float(asked)  # float ok: seconds
        return backoff(state)

    return wait


# -- payload mapping ------------------------------------------------------------------------------


def customer_rule(rule: str | None) -> tuple[str, str | None]:
    """`external` (default), `id`, or `metadata` with its key."""
    if rule in (None, "", "external_customer_id"):
        return "external", None
    if rule == "id":
        return "id", None
    key = rule.removeprefix("metadata.") if isinstance(rule, str) else ""
    if not key or key == rule:
        raise ConfigError(
            f"orb.customer_id_from: must be 'external_customer_id', 'id' or 'metadata.<key>' (got {rule!r})"
        )
    return "metadata", key


def _reductions(item: Json, line: InvoiceLine) -> list[InvoiceLine]:
    """The line's adjustments and prepaid credits as amount-only lines on its key."""
    found: list[InvoiceLine] = []
    for adjustment in item.get("adjustments") or []:
        kind = adjustment.get("adjustment_type")
        value = abs(Decimal(adjustment.get("amount") or 0))
        if kind in DISCOUNTS:
            found.append(_amount_line(line, f"{line.line_id}:{adjustment['id']}", -value, "credit"))
        elif kind in ("minimum", "maximum"):
            sign = 1 if kind == "minimum" else -1
            found.append(_amount_line(line, f"{line.line_id}:{adjustment['id']}", sign * value, "adjustment"))
    credits = abs(Decimal(item.get("credits_applied") or 0))
    if credits:
        found.append(_amount_line(line, f"{line.line_id}:credits_applied", -credits, "credit"))
    return [r for r in found if r.amount]


def _amount_line(line: InvoiceLine, line_id: str, amount: Decimal, kind: str) -> InvoiceLine:
    return InvoiceLine(
        invoice_id=line.invoice_id,
        line_id=line_id,
        customer_id=line.customer_id,
        meter=line.meter,
        period_start=line.period_start,
        period_end=line.period_end,
        quantity=ZERO,
        amount=amount,
        currency=line.currency,
        kind=kind,
    )


def _quantity(item: Json) -> Decimal:
    subs = [s for s in item.get("sub_line_items") or [] if s.get("quantity") is not None]
    if subs:
        return sum((Decimal(s["quantity"]) for s in subs), ZERO)
    return ZERO if item.get("quantity") is None else Decimal(item["quantity"])


def _instant(value: Any) -> datetime:
    moment = parse_instant(str(value))
    if moment is None:
        raise TypeError(f"not a time: {value!r}")
    return moment


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _idempotency_key(key: str) -> str:
    if len(key) <= MAX_IDEMPOTENCY_KEY:
        return key
    return hashlib.sha256(key.encode()).hexdigest()
