"""connectors/orb.py against a fake Orb at the HTTP boundary (`responses`); see tests/orb_fake.py."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import requests
from responses import matchers

from connectors.base import ConnectorError, InvoiceSummary, UpstreamRejected, UpstreamUnavailable, period_records
from rules.config import ConfigError
from tests.orb_fake import (
    BASE,
    CUSTOMER,
    DEC,
    INVOICE,
    NOV,
    OCT,
    ORB_CUSTOMER,
    SUBSCRIPTION,
    adjustment,
    at,
    billing,
    credit_note,
    invoice,
    line_item,
    note_summary,
    page,
    query,
    serve_invoice,
    serve_usage,
    tiered,
)

MID = "2026-10-11T00:00:00+00:00"

# -- line items -----------------------------------------------------------------------


def test_a_usage_line_item_maps_to_its_meter_by_billable_metric(orb_api):
    serve_invoice(orb_api, invoice([line_item("li_api", quantity=70.5, subtotal="141.00")]))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [100, 20.25]})

    records = billing().invoice_records(INVOICE)

    (line,) = records.lines
    assert (records.customer_id, records.period_start, records.period_end) == (CUSTOMER, at(OCT), at(NOV))
    assert (line.meter, line.kind, line.currency, line.customer_id) == ("api_calls", "usage", "usd", CUSTOMER)
    assert line.quantity == Decimal("70.5") and line.amount == Decimal("141.00")
    (metered,) = records.metered
    assert (metered.meter, metered.period_start, metered.period_end) == ("api_calls", at(OCT), at(NOV))
    assert metered.quantity == Decimal("120.25") and str(metered.quantity) == "120.25"


def test_lines_map_by_price_or_item_and_unknown_metrics_stay_unmapped(orb_api):
    config = """
[[meters]]
name = "api_calls"
unit_price = "2.00"
orb_price = "ext_api"

[[meters]]
name = "storage"
unit_price = "0.10"
orb_item = "item_storage"
"""
    lines = [
        line_item("li_a", metric="metric_x", price_id="price_1") | {},
        line_item("li_b", metric="metric_storage", item="item_storage", price_id="price_2"),
        line_item("li_c", metric="metric_unknown", item="item_other", price_id="price_3"),
        line_item("li_fee", metric=None, item="item_platform", price_id="price_fee", price_type="fixed_price"),
    ]
    lines[0]["price"]["external_price_id"] = "ext_api"
    serve_invoice(orb_api, invoice(lines))
    serve_usage(orb_api, OCT, NOV, {"metric_x": [7], "metric_storage": [9]})

    records = billing(config).invoice_records(INVOICE)

    assert [(ln.line_id, ln.meter) for ln in records.lines] == [
        ("li_a", "api_calls"),
        ("li_b", "storage"),
        ("li_c", "metric_unknown"),  # a usage price mapped to no meter: unmapped
    ]  # the fixed fee is not usage
    assert [(m.meter, m.quantity) for m in records.metered] == [("api_calls", 7), ("storage", 9)]


def test_tiered_sub_line_items_give_the_exact_quantity(orb_api):
    line = tiered(
        line_item("li_tiered", quantity=120.00000000000001, subtotal="140.00"),
        [(0, 50, "0.00", 50, "0.00"), (50, None, "2.00", 70.5, "141.00")],
    )
    serve_invoice(orb_api, invoice([line]))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [120.5]})

    (only,) = billing().invoice_records(INVOICE).lines

    assert only.quantity == Decimal("120.5") and only.amount == Decimal("140.00")


def test_grouped_matrix_sub_lines_all_count_to_the_meter(orb_api):
    line = line_item("li_matrix", quantity=0, subtotal="9.00")
    line["sub_line_items"] = [
        {
            "amount": amount,
            "grouping": {"key": "region", "value": value},
            "matrix_config": {"dimension_values": [value]},
            "name": "Tier One",
            "quantity": quantity,
            "type": "matrix",
        }
        for value, quantity, amount in (("west", 3, "7.00"), (None, 1.5, "2.00"))
    ]
    serve_invoice(orb_api, invoice([line]))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [4.5]})

    (only,) = billing().invoice_records(INVOICE).lines

    assert only.quantity == Decimal("4.5")


def test_a_partial_line_beside_the_full_one_is_proration_each_span_measured(orb_api):
    lines = [
        line_item("li_old", end=MID, quantity=10, subtotal="0.00"),
        line_item("li_new", start=MID, quantity=30, subtotal="0.00", price_id="price_api_v2"),
        line_item("li_month", quantity=40, subtotal="0.00", price_id="price_api_v3"),
    ]
    serve_invoice(orb_api, invoice(lines))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [40]})

    records = billing().invoice_records(INVOICE)

    assert [ln.kind for ln in records.lines] == ["proration", "proration", "usage"]
    assert [(m.period_start, m.period_end) for m in records.metered] == [(at(OCT), at(NOV))]  # merged: asked once


def test_adjacent_plan_change_spans_are_asked_separately(orb_api):
    lines = [line_item("li_old", end=MID, quantity=10), line_item("li_new", start=MID, quantity=30)]
    serve_invoice(orb_api, invoice(lines))
    serve_usage(orb_api, OCT, MID, {"metric_api": [10]})
    serve_usage(orb_api, MID, NOV, {"metric_api": [29, 1]})

    records = billing().invoice_records(INVOICE)

    assert [ln.kind for ln in records.lines] == ["proration", "proration"]
    assert [(m.period_start, m.quantity) for m in records.metered] == [(at(OCT), 10), (at(MID), 30)]


def test_adjustments_and_prepaid_credits_become_amount_only_lines(orb_api):
    line = line_item(
        "li_api",
        adjustments=[adjustment("adj_d", "amount_discount", "10.00"), adjustment("adj_m", "minimum", "5.00")],
        credits_applied="20.00",
    )
    serve_invoice(orb_api, invoice([line]))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [120]})

    lines = billing().invoice_records(INVOICE).lines

    assert [(ln.line_id, ln.kind, ln.quantity, ln.amount, ln.meter) for ln in lines] == [
        ("li_api", "usage", 70, Decimal("140.00"), "api_calls"),
        ("li_api:adj_d", "credit", 0, Decimal("-10.00"), "api_calls"),
        ("li_api:adj_m", "adjustment", 0, Decimal("5.00"), "api_calls"),
        ("li_api:credits_applied", "credit", 0, Decimal("-20.00"), "api_calls"),
    ]
    assert {(ln.period_start, ln.period_end) for ln in lines} == {(at(OCT), at(NOV))}


def test_credit_notes_credit_the_line_of_their_item_and_voided_ones_are_skipped(orb_api):
    body = invoice([line_item("li_api")], credit_notes=[note_summary("cn_1"), note_summary("cn_void", voided=True)])
    serve_invoice(orb_api, body)
    orb_api.get(f"{BASE}/credit_notes/cn_1", json=credit_note("cn_1", [("cnli_1", "item_api", "20.00")]))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [120]})

    credits = [ln for ln in billing().invoice_records(INVOICE).lines if ln.kind == "credit"]

    assert [(c.line_id, c.meter, c.amount, c.period_start) for c in credits] == [
        ("cnli_1", "api_calls", Decimal("-20.00"), at(OCT))
    ]


def test_customer_identity_rules(orb_api):
    orb_api.get(
        f"{BASE}/customers/{ORB_CUSTOMER}",
        json={"id": ORB_CUSTOMER, "external_customer_id": CUSTOMER, "metadata": {"account_id": "acct-42"}},
    )
    serve_invoice(orb_api, invoice([line_item("li_api")]))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [1]})
    source = billing(extra='\n[orb]\ncustomer_id_from = "metadata.account_id"\n')

    records = source.invoice_records(INVOICE)

    assert records.customer_id == "acct-42" and {m.customer_id for m in records.metered} == {"acct-42"}
    assert billing(customer_id_from="id").customer_id({"id": ORB_CUSTOMER}) == ORB_CUSTOMER
    assert billing().customer_id({"id": ORB_CUSTOMER, "external_customer_id": None}) == ""


def test_an_unknown_customer_rule_is_a_config_error():
    with pytest.raises(ConfigError, match=r"orb\.customer_id_from"):
        billing(extra='\n[orb]\ncustomer_id_from = "email"\n')


def test_a_one_off_invoice_has_no_metered_records(orb_api):
    serve_invoice(orb_api, invoice([line_item("li_api")], subscription=None))

    records = billing().invoice_records(INVOICE)

    assert records.metered == [] and len(records.lines) == 1


def test_a_payload_without_a_needed_field_is_a_connector_error(orb_api):
    body = invoice([line_item("li_api")])
    del body["line_items"][0]["start_date"]
    serve_invoice(orb_api, body)

    with pytest.raises(ConnectorError, match=f"invoice {INVOICE}: unexpected payload"):
        billing().invoice_records(INVOICE)


# -- listing and periods ---------------------------------------------------------------


def test_invoice_listing_follows_the_cursor(orb_api):
    listed = [invoice(id=f"in_{n}", invoice_date=NOV) for n in range(3)]
    first = query(limit="100", **{"invoice_date[gt]": OCT, "status[]": ["draft", "issued", "paid", "synced"]})
    second = query(
        limit="100", cursor="c_2", **{"invoice_date[gt]": OCT, "status[]": ["draft", "issued", "paid", "synced"]}
    )
    orb_api.get(f"{BASE}/invoices", json=page(listed[:2], next_cursor="c_2"), match=[first])
    orb_api.get(f"{BASE}/invoices", json=page(listed[2:]), match=[second])

    found = list(billing().list_recent_invoices(at(OCT)))

    assert [s.id for s in found] == ["in_0", "in_1", "in_2"]
    assert found[0] == InvoiceSummary("in_0", ORB_CUSTOMER, "issued", at(NOV))


def test_period_records_keep_what_lies_inside_the_period(orb_api):
    october = invoice([line_item("li_oct")], id="in_oct")
    november = invoice([line_item("li_nov", start=NOV, end=DEC)], id="in_nov")
    orb_api.get(f"{BASE}/invoices", json=page([october, november]))
    serve_invoice(orb_api, october)
    serve_invoice(orb_api, november)
    serve_usage(orb_api, OCT, NOV, {"metric_api": [120]})
    serve_usage(orb_api, NOV, DEC, {"metric_api": [5]})

    metered, lines = period_records(billing(), at(OCT), at(NOV), frozenset({CUSTOMER}))

    assert [ln.line_id for ln in lines] == ["li_oct"]
    assert [(m.meter, m.quantity) for m in metered] == [("api_calls", 120)]
    (listing,) = [c for c in orb_api.calls if c.request.url.startswith(f"{BASE}/invoices?")]
    assert "invoice_date%5Bgte%5D=2026-09-30" in listing.request.url


# -- errors and retries ----------------------------------------------------------------


def test_a_429_is_retried_after_the_wait_orb_asks_for(orb_api):
    url = f"{BASE}/invoices/{INVOICE}"
    orb_api.get(url, status=429, json={"title": "Too many requests", "status": 429}, headers={"Retry-After": "7"})
    serve_invoice(orb_api, invoice([line_item("li_api")]))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [1]})
    slept: list[float] = []

    records = billing(sleep=slept.append).invoice_records(INVOICE)

    assert [ln.line_id for ln in records.lines] == ["li_api"]
    assert slept == [7.0]


@pytest.mark.parametrize("status", [500, 503, 409])
def test_server_errors_give_up_after_the_attempts(orb_api, status):
    orb_api.get(f"{BASE}/invoices/{INVOICE}", status=status, json={"title": "Internal server error"})

    with pytest.raises(UpstreamUnavailable, match=f"HTTP {status}"):
        billing(max_attempts=3).invoice_records(INVOICE)

    assert len(orb_api.calls) == 3


def test_retries_stop_at_the_time_limit(orb_api):
    orb_api.get(f"{BASE}/invoices/{INVOICE}", status=503, json={"title": "Unavailable"})

    with pytest.raises(UpstreamUnavailable):
        billing(max_attempts=5, max_elapsed=0).invoice_records(INVOICE)

    assert len(orb_api.calls) == 1


def test_connection_failures_are_retried_then_given_up(orb_api):
    orb_api.get(f"{BASE}/invoices/{INVOICE}", body=requests.exceptions.ConnectionError("refused"))

    with pytest.raises(UpstreamUnavailable):
        billing(max_attempts=2).invoice_records(INVOICE)

    assert len(orb_api.calls) == 2


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_rejected_without_retry(orb_api, status):
    body = {"title": "Not found", "detail": "No invoice with id", "status": status}
    orb_api.get(f"{BASE}/invoices/{INVOICE}", status=status, json=body)

    with pytest.raises(UpstreamRejected, match=f"HTTP {status}"):
        billing().invoice_records(INVOICE)

    assert len(orb_api.calls) == 1
    assert orb_api.calls[0].request.headers["Authorization"] == "Bearer orb_test_key"


# -- writes ----------------------------------------------------------------------------


def test_add_charge_goes_on_the_draft_invoice_once_per_key(orb_api):
    draft = invoice([line_item("li_api")], id="in_draft", status="draft", invoice_date=NOV)
    orb_api.get(
        f"{BASE}/invoices",
        json=page([draft]),
        match=[query(limit="100", external_customer_id=CUSTOMER, **{"status[]": "draft"})],
    )
    created = orb_api.post(
        f"{BASE}/invoice_line_items",
        json={"id": "li_oneoff", "amount": "60.00", "quantity": 1},
        match=[
            matchers.json_params_matcher(
                {
                    "invoice_id": "in_draft",
                    "amount": "60.00",
                    "quantity": 1,
                    "start_date": "2026-11-01",
                    "end_date": "2026-11-01",
                    "name": "api_calls overage 2026-10",
                }
            ),
            matchers.header_matcher({"Idempotency-Key": "recon-acme-api_calls-2026-10"}),
        ],
    )

    made = billing().add_charge(
        CUSTOMER, Decimal("60.00"), "usd", "api_calls overage 2026-10", "recon-acme-api_calls-2026-10"
    )

    assert made == "li_oneoff" and created.call_count == 1


def test_add_charge_without_a_draft_is_refused(orb_api):
    orb_api.get(f"{BASE}/invoices", json=page([]))

    with pytest.raises(UpstreamRejected, match="no draft invoice"):
        billing().add_charge(CUSTOMER, Decimal("1.00"), "usd", "x", "key-1")


def test_issue_credit_increments_the_customer_balance_retrying_under_the_same_key(orb_api):
    serve_invoice(orb_api, invoice([line_item("li_api")]))
    url = f"{BASE}/customers/{ORB_CUSTOMER}/balance_transactions"
    key = "k" * 80  # longer than Orb's 64: sent hashed, the same on every attempt
    orb_api.post(url, status=500, json={"title": "Internal server error"})
    orb_api.post(url, json={"id": "cbt_1", "amount": "12.50", "type": "increment"})

    made = billing().issue_credit(CUSTOMER, INVOICE, Decimal("-12.50"), "usd", "over-bill api_calls", key)

    assert made == "cbt_1"
    posts = [c.request for c in orb_api.calls if c.request.method == "POST"]
    assert len(posts) == 2
    assert {p.headers["Idempotency-Key"] for p in posts} == {posts[0].headers["Idempotency-Key"]}
    assert len(posts[0].headers["Idempotency-Key"]) == 64
    assert json.loads(posts[1].body) == {
        "amount": "12.50",
        "type": "increment",
        "description": f"over-bill api_calls (invoice {INVOICE})",
    }


def test_issue_credit_without_an_invoice_finds_the_customer_by_external_id(orb_api):
    orb_api.get(f"{BASE}/customers/external_customer_id/{CUSTOMER}", json={"id": ORB_CUSTOMER})
    orb_api.post(
        f"{BASE}/customers/{ORB_CUSTOMER}/balance_transactions",
        json={"id": "cbt_2"},
        match=[matchers.header_matcher({"Idempotency-Key": "credit-1"})],
    )

    assert billing().issue_credit(CUSTOMER, None, Decimal("3"), "usd", "credit", "credit-1") == "cbt_2"


def test_hold_draft_marks_the_draft_and_says_it_cannot_hold(orb_api, caplog):
    orb_api.put(
        f"{BASE}/invoices/{INVOICE}",
        json=invoice(status="draft"),
        match=[
            matchers.json_params_matcher({"metadata": {"recon_hold": "why", "recon_run_id": "run_1"}}),
            matchers.header_matcher({"Idempotency-Key": f"recon-hold-{INVOICE}-run_1"}),
        ],
    )

    billing().hold_draft(INVOICE, "why", "run_1")

    assert "Orb cannot hold a draft" in caplog.text


def test_the_subscription_is_asked_for_usage_not_the_customer(orb_api):
    serve_invoice(orb_api, invoice([line_item("li_api")], subscription={"id": "sub_other"}))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [2]}, subscription="sub_other")

    (metered,) = billing().invoice_records(INVOICE).metered

    assert metered.quantity == 2 and SUBSCRIPTION != "sub_other"


def test_the_sweep_skips_drafts_dated_in_the_future(orb_api):
    future = invoice(id="in_next", status="draft", invoice_date="2999-01-01T00:00:00+00:00")
    orb_api.get(f"{BASE}/invoices", json=page([future, invoice(id="in_done")]))

    assert [s.id for s in billing().list_recent_invoices(at(OCT))] == ["in_done"]
