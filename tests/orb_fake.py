"""A fake Orb at the HTTP boundary (`responses`), serving payloads shaped like Orb's own.

No complete real Orb invoice or credit note is published (see
/work/shared/fixtures/orb/SOURCE.md), so tests/fixtures/orb_invoice.json and
orb_credit_note.json are built field for field from the `orb-billing` SDK's types
(`orb.types.shared.Invoice`, `CreditNote`, v4.90) with values from the OpenAPI
spec's field examples; every invoice and credit note this module serves is checked
against those SDK models first (`model_validate`), so a shape Orb does not have
cannot slip in. Subscription usage is the SDK's documented example
(/work/shared/fixtures/orb/subscription_usage_windowed.json) with ids and
quantities set.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import responses
from orb.types.shared import CreditNote, Invoice
from responses import matchers

from connectors.orb import OrbBilling
from rules.config import parse_config

BASE = "http://orb.test/v1"
FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "orb"
INVOICE = "in_orb_1"
CUSTOMER = "acme"  # the invoice customer's external_customer_id
ORB_CUSTOMER = "XuxCbt7x9L82yyeF"
SUBSCRIPTION = "VDGsT23osdLb84KD"
OCT, NOV, DEC = "2026-10-01T00:00:00+00:00", "2026-11-01T00:00:00+00:00", "2026-12-01T00:00:00+00:00"

METERS = """
[[meters]]
name = "api_calls"
unit_price = "2.00"
included = 50
orb_metric = "metric_api"

[[meters]]
name = "storage"
unit_price = "0.10"
orb_item = "item_storage"
"""


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"orb_{name}.json").read_text())


def line_item(
    line_id: str,
    *,
    metric: str | None = "metric_api",
    item: str = "item_api",
    price_id: str = "price_api",
    start: str = OCT,
    end: str = NOV,
    quantity: Any = 70,
    subtotal: str = "140.00",
    price_type: str = "usage_price",
    **fields: Any,
) -> dict[str, Any]:
    line = copy.deepcopy(fixture("invoice")["line_items"][0])
    line.update(id=line_id, start_date=start, end_date=end, quantity=quantity, subtotal=subtotal, **fields)
    line["price"].update(id=price_id, price_type=price_type, billable_metric={"id": metric} if metric else None)
    line["price"]["item"] = {"id": item, "name": item}
    return line


def tiered(line: dict[str, Any], tiers: list[tuple[int, int | None, str, Any, str]]) -> dict[str, Any]:
    """A tiered price, with one `tier` sub-line item per (first, last, unit_amount, quantity, amount)."""
    line["price"].pop("unit_config")
    line["price"]["model_type"] = "tiered"
    line["price"]["tiered_config"] = {
        "tiers": [{"first_unit": f, "last_unit": last, "unit_amount": unit} for f, last, unit, _, _ in tiers]
    }
    line["sub_line_items"] = [
        {
            "amount": amount,
            "grouping": None,
            "name": f"Tier {n + 1}",
            "quantity": quantity,
            "tier_config": {"first_unit": f, "last_unit": last, "unit_amount": unit},
            "type": "tier",
        }
        for n, (f, last, unit, quantity, amount) in enumerate(tiers)
    ]
    return line


def adjustment(adjustment_id: str, kind: str, amount: str) -> dict[str, Any]:
    base = {
        "id": adjustment_id,
        "adjustment_type": kind,
        "amount": amount,
        "applies_to_price_ids": ["price_api"],
        "filters": [],
        "is_invoice_level": False,
        "reason": None,
        "replaces_adjustment_id": None,
    }
    if kind == "amount_discount":
        base["amount_discount"] = amount
    if kind == "minimum":
        base.update(item_id="item_api", minimum_amount=amount)
    return base


def invoice(lines: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    body = fixture("invoice")
    if lines is not None:
        body["line_items"] = lines
    body.update(fields)
    Invoice.model_validate(body)  # the shape is Orb's, per its SDK
    return body


def credit_note(note_id: str, entries: list[tuple[str, str, str]], **fields: Any) -> dict[str, Any]:
    """A credit note with one line item per (id, item_id, amount)."""
    note = fixture("credit_note")
    template = note["line_items"][0]
    note["line_items"] = [template | {"id": i, "item_id": item, "amount": a, "subtotal": a} for i, item, a in entries]
    note.update(id=note_id, **fields)
    CreditNote.model_validate(note)
    return note


def note_summary(note_id: str, voided: bool = False) -> dict[str, Any]:
    """A credit note as the invoice embeds it."""
    return {
        "id": note_id,
        "credit_note_number": "CN-00001",
        "memo": None,
        "reason": "Product unsatisfactory",
        "total": "20.00",
        "type": "adjustment",
        "voided_at": "2026-11-06T00:00:00+00:00" if voided else None,
    }


def usage(windows: dict[str, list[Any]]) -> dict[str, Any]:
    """Orb's windowed usage response: per metric id, one daily window per quantity."""
    example = json.loads((SHARED / "subscription_usage_windowed.json").read_text())["data"][0]
    data = []
    for metric, quantities in windows.items():
        entry = copy.deepcopy(example)
        entry["billable_metric"] = {"id": metric, "name": metric}
        entry["usage"] = [
            example["usage"][n % len(example["usage"])] | {"quantity": q} for n, q in enumerate(quantities)
        ]
        data.append(entry)
    return {"data": data}


def page(data: list[dict[str, Any]], next_cursor: str | None = None) -> dict[str, Any]:
    return {"data": data, "pagination_metadata": {"has_more": next_cursor is not None, "next_cursor": next_cursor}}


def query(**params: Any) -> Any:
    return matchers.query_param_matcher(params)


def billing(meters: str = METERS, extra: str = "", **kwargs: Any) -> OrbBilling:
    config = parse_config(meters + extra)
    kwargs = {"max_attempts": 4, "max_elapsed": 60, "wait_initial": 0, "wait_max": 0, "sleep": lambda s: None} | kwargs
    return OrbBilling(config, "orb_test_key", BASE, **kwargs)


def serve_invoice(rsps: responses.RequestsMock, body: dict[str, Any]) -> None:
    rsps.get(f"{BASE}/invoices/{body['id']}", json=body)


def serve_usage(
    rsps: responses.RequestsMock, start: str, end: str, windows: dict[str, list[Any]], subscription: str = SUBSCRIPTION
) -> None:
    rsps.get(
        f"{BASE}/subscriptions/{subscription}/usage",
        body=json.dumps(usage(windows)),  # quantities are JSON numbers, as Orb sends them
        content_type="application/json",
        match=[query(timeframe_start=start, timeframe_end=end, view_mode="periodic")],
    )
