"""A fake Stripe at the HTTP boundary (`responses`), serving payloads shaped like Stripe's own.

The payloads are tests/fixtures/stripe_*.json, derived from Stripe's OpenAPI
fixtures (/work/shared/fixtures/stripe, see its SOURCE.md) with their generated
inconsistencies fixed as a real payload has them: a line's `parent` carries only
the branch named by its `type`, `pricing.price_details` is present, a credit note
that is `issued` has no `voided_at`. `stripe_invoice_line_acacia.json` is the same
line in the pre-basil shape (top-level `price`, `proration`, `type`,
`subscription_item`, `invoice_item`). Tests set only ids, amounts and periods.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import responses
from responses import matchers

from connectors.stripe import StripeBilling, make_client
from rules.config import parse_config

BASE = "http://stripe.test"
FIXTURES = Path(__file__).parent / "fixtures"
INVOICE = "in_1Pgc6tB7WZ01zgkWu9fdqL6I"
CUSTOMER = "cus_QXg1o8vcGmoR32"
OCT, NOV, DEC = 1790812800, 1793491200, 1796083200  # 2026-10-01, 2026-11-01, 2026-12-01 UTC

METERS = """
[[meters]]
name = "api_calls"
unit_price = "2.00"
stripe_price = "price_api"

[[meters]]
name = "support"
unit_price = "1.00"
"""

METERED = """
[[meters]]
name = "api_calls"
unit_price = "2.00"
stripe_price = "price_api"
stripe_meter = "mtr_api"

[[meters]]
name = "storage"
unit_price = "0.10"
stripe_meter = "mtr_storage"
"""


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"stripe_{name}.json").read_text())


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def line(
    line_id: str,
    price: str | None = "price_api",
    *,
    start: int = OCT,
    end: int = NOV,
    amount: int = 1000,
    quantity: str | None = "500",
    currency: str = "usd",
    parent: str = "subscription_item_details",
    proration: bool = False,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A current-shape line (basil and later)."""
    item = fixture("invoice_line")
    item.update(id=line_id, amount=amount, subtotal=amount, currency=currency, metadata=metadata or {})
    item["period"] = {"start": start, "end": end}
    item["quantity_decimal"] = quantity
    item["pricing"]["price_details"] = {"price": price, "product": "prod_QXg1hqf4jFNsqG"} if price else None
    details = item["parent"]["subscription_item_details"]
    item["parent"] = {"invoice_item_details": None, "subscription_item_details": None, "type": parent}
    item["parent"][parent] = details | {"proration": proration}
    return item


def acacia_line(line_id: str, price: str, *, proration: bool, amount: int = 1000) -> dict[str, Any]:
    """A pre-basil line: top-level `price` object and `proration`, integer `quantity` only."""
    item = fixture("invoice_line_acacia")
    item.update(id=line_id, amount=amount, subtotal=amount, proration=proration, quantity=7)
    item["period"] = {"start": OCT, "end": NOV}
    item["price"]["id"] = price
    return item


def page(url: str, data: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return fixture("list") | {"url": url, "data": data, "has_more": has_more}


def invoice(currency: str = "usd", customer: str | None = CUSTOMER, **fields: Any) -> dict[str, Any]:
    return fixture("invoice") | {"id": INVOICE, "customer": customer, "currency": currency, **fields}


def credit_note(note_id: str, lines: list[dict[str, Any]], status: str = "issued", **fields: Any) -> dict[str, Any]:
    note = fixture("credit_note")
    note.update(id=note_id, invoice=INVOICE, status=status, **fields)
    note["lines"] = page(f"/v1/credit_notes/{note_id}/lines", lines)
    return note


def credit_note_line(
    item_id: str, amount: int, invoice_line: str | None = None, meter: str | None = None
) -> dict[str, Any]:
    first, custom = fixture("credit_note")["lines"]["data"]
    item = copy.deepcopy(first if invoice_line else custom)
    item.update(id=item_id, amount=amount, invoice_line_item=invoice_line, metadata={"meter": meter} if meter else None)
    return item


def summary(value: Any, start: int, end: int) -> dict[str, Any]:
    return fixture("meter_event_summary") | {"aggregated_value": value, "start_time": start, "end_time": end}


def query(**params: Any) -> Any:
    return matchers.query_param_matcher({k: str(v) for k, v in params.items()})


def billing(meters: str = METERS, extra: str = "", **kwargs: Any) -> StripeBilling:
    config = parse_config(meters + extra)
    kwargs = {"max_attempts": 4, "max_elapsed": 60, "wait_initial": 0, "wait_max": 0} | kwargs
    return StripeBilling(make_client("sk_test_123", BASE), config, **kwargs)


def serve_invoice(rsps: responses.RequestsMock, lines: list[dict[str, Any]], notes: tuple = (), **fields: Any) -> None:
    """The invoice, its lines on one page and its credit notes."""
    rsps.get(f"{BASE}/v1/invoices/{INVOICE}", json=invoice(**fields))
    rsps.get(
        f"{BASE}/v1/invoices/{INVOICE}/lines",
        json=page(f"/v1/invoices/{INVOICE}/lines", lines),
        match=[query(limit=100)],
    )
    serve_credit_notes(rsps, list(notes))


def serve_credit_notes(rsps: responses.RequestsMock, notes: list[dict[str, Any]]) -> None:
    rsps.get(f"{BASE}/v1/credit_notes", json=page("/v1/credit_notes", notes), match=[query(limit=100, invoice=INVOICE)])


def serve_summaries(rsps: responses.RequestsMock, meter: str, start: int, end: int, values: list[Any]) -> None:
    body = page(f"/v1/billing/meters/{meter}/event_summaries", [summary(v, start, end) for v in values])
    rsps.get(
        f"{BASE}/v1/billing/meters/{meter}/event_summaries",
        body=json.dumps(body),  # serialised as Stripe does: aggregated_value is a JSON number
        content_type="application/json",
        match=[query(limit=100, customer=CUSTOMER, start_time=start, end_time=end)],
    )
