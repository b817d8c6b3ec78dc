"""connectors/stripe.py against a fake Stripe at the HTTP boundary (`responses`).

The payloads are tests/fixtures/stripe_*.json, derived from Stripe's own OpenAPI
fixtures (/work/shared/fixtures/stripe, see its SOURCE.md) with their generated
inconsistencies fixed as a real payload has them: a line's `parent` carries only
the branch named by its `type`, `pricing.price_details` is present, a credit note
that is `issued` has no `voided_at`. `stripe_invoice_line_acacia.json` is the same
line in the pre-basil shape (top-level `price`, `proration`, `type`,
`subscription_item`, `invoice_item`). Tests set only ids, amounts and periods.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import requests

from connectors.base import ConnectorError, UpstreamRejected, UpstreamUnavailable
from connectors.stripe import (
    API_VERSION,
    InvoiceSummary,
    merge_spans,
    to_major_units,
    to_minor_units,
)
from rules.config import ConfigError
from tests.stripe_fake import (
    BASE,
    CUSTOMER,
    DEC,
    INVOICE,
    METERED,
    NOV,
    OCT,
    acacia_line,
    at,
    billing,
    credit_note,
    credit_note_line,
    fixture,
    invoice,
    line,
    page,
    query,
    serve_credit_notes,
    serve_invoice,
    serve_summaries,
    summary,
)

# -- invoice lines ------------------------------------------------------------------


def test_pages_through_every_invoice_line(stripe_api):
    url = f"{BASE}/v1/invoices/{INVOICE}/lines"
    path = f"/v1/invoices/{INVOICE}/lines"
    stripe_api.get(f"{BASE}/v1/invoices/{INVOICE}", json=invoice())
    stripe_api.get(url, json=page(path, [line("il_1"), line("il_2")], has_more=True), match=[query(limit=100)])
    stripe_api.get(url, json=page(path, [line("il_3")], has_more=True), match=[query(limit=100, starting_after="il_2")])
    stripe_api.get(url, json=page(path, [line("il_4")]), match=[query(limit=100, starting_after="il_3")])
    serve_credit_notes(stripe_api, [])

    records = billing().invoice_records(INVOICE)

    assert [ln.line_id for ln in records.lines] == ["il_1", "il_2", "il_3", "il_4"]
    assert {ln.meter for ln in records.lines} == {"api_calls"}
    assert (records.customer_id, records.period_start, records.period_end) == (CUSTOMER, at(OCT), at(NOV))
    assert records.metered == []


def test_current_line_shape_maps_to_a_canonical_line(stripe_api):
    serve_invoice(stripe_api, [line("il_1", amount=123456, quantity="1234.5")])

    (only,) = billing().invoice_records(INVOICE).lines

    assert only.invoice_id == INVOICE and only.line_id == "il_1" and only.customer_id == CUSTOMER
    assert (only.meter, only.kind, only.currency) == ("api_calls", "usage", "usd")
    assert (only.period_start, only.period_end) == (at(OCT), at(NOV))
    assert only.quantity == Decimal("1234.5") and only.amount == Decimal("1234.56")


def test_old_line_shape_maps_by_its_price_object_and_proration_flag(stripe_api):
    serve_invoice(
        stripe_api,
        [acacia_line("il_old", "price_api", proration=False), acacia_line("il_pro", "price_api", proration=True)],
    )

    usage, proration = billing().invoice_records(INVOICE).lines

    assert (usage.meter, usage.kind, usage.quantity, usage.amount) == (
        "api_calls",
        "usage",
        Decimal(7),
        Decimal("10.00"),
    )
    assert (proration.meter, proration.kind) == ("api_calls", "proration")


@pytest.mark.parametrize("parent", ["subscription_item_details", "invoice_item_details"])
def test_proration_is_read_from_the_parent_branch_named_by_its_type(stripe_api, parent):
    lines = [line("il_full", parent=parent), line("il_part", start=OCT, end=OCT + 86400, parent=parent, proration=True)]
    serve_invoice(stripe_api, lines)

    kinds = [ln.kind for ln in billing().invoice_records(INVOICE).lines]

    assert kinds == ["usage", "proration"]


def test_zero_decimal_currency_amount_is_whole_units(stripe_api):
    serve_invoice(stripe_api, [line("il_jpy", amount=1500, currency="jpy")], currency="jpy")

    (only,) = billing().invoice_records(INVOICE).lines

    assert (only.amount, only.currency) == (Decimal(1500), "jpy")


@pytest.mark.parametrize(
    ("minor", "currency", "major"),
    [
        (1234, "usd", "12.34"),
        (1500, "JPY", "1500"),
        (1235, "kwd", "1.235"),
        (10000, "isk", "100.00"),
        (-50, "eur", "-0.50"),
    ],
)
def test_minor_units_become_major_units(minor, currency, major):
    assert to_major_units(minor, currency) == Decimal(major)
    assert str(to_major_units(minor, currency)) == major


def test_unmapped_line_keeps_its_price_id_or_nothing(stripe_api):
    lines = [
        line("il_other", "price_unknown"),
        line("il_no_price", None),
        line("il_named", None, metadata={"meter": "support"}),
    ]
    serve_invoice(stripe_api, lines)

    meters = [ln.meter for ln in billing().invoice_records(INVOICE).lines]

    assert meters == ["price_unknown", "", "support"]


def test_line_maps_through_its_price_meter_and_the_price_is_fetched_once(stripe_api):
    price = fixture("price_metered") | {"id": "price_storage"}
    price["recurring"]["meter"] = "mtr_storage"
    stripe_api.get(f"{BASE}/v1/prices/price_storage", json=price)
    serve_invoice(stripe_api, [line("il_1", "price_storage"), line("il_2", "price_storage", start=NOV, end=DEC)])
    serve_summaries(stripe_api, "mtr_storage", OCT, NOV, [5])
    serve_summaries(stripe_api, "mtr_storage", NOV, DEC, [6])
    serve_summaries(stripe_api, "mtr_api", OCT, DEC, [])  # api_calls has no line: the invoice's period

    records = billing(METERED).invoice_records(INVOICE)

    assert [ln.meter for ln in records.lines] == ["storage", "storage"]
    assert len([c for c in stripe_api.calls if "/v1/prices/" in c.request.url]) == 1
    assert [(m.meter, m.period_start, m.quantity) for m in records.metered] == [
        ("api_calls", at(OCT), Decimal(0)),
        ("storage", at(OCT), Decimal(5)),
        ("storage", at(NOV), Decimal(6)),
    ]


# -- credit notes -------------------------------------------------------------------


def test_credit_note_lines_become_negative_credit_lines(stripe_api):
    lines = [line("il_api"), line("il_support", None, metadata={"meter": "support"}, start=NOV, end=DEC)]
    note = credit_note(
        "cn_1",
        [credit_note_line("cnli_1", 1190, invoice_line="il_api"), credit_note_line("cnli_2", 500, meter="support")],
    )
    voided = credit_note("cn_void", [credit_note_line("cnli_3", 999, invoice_line="il_api")], status="void")
    serve_invoice(stripe_api, lines, notes=(note, voided))

    records = billing().invoice_records(INVOICE)
    credits = [ln for ln in records.lines if ln.kind == "credit"]

    assert [(c.line_id, c.meter, c.amount, c.quantity) for c in credits] == [
        ("cnli_1", "api_calls", Decimal("-11.90"), Decimal(0)),
        ("cnli_2", "support", Decimal("-5.00"), Decimal(0)),
    ]
    assert (credits[0].period_start, credits[0].period_end) == (at(OCT), at(NOV))
    assert (credits[1].period_start, credits[1].period_end) == (at(NOV), at(DEC))
    assert {c.invoice_id for c in credits} == {INVOICE} and {c.currency for c in credits} == {"usd"}


def test_credit_note_lines_beyond_the_embedded_page_are_fetched(stripe_api):
    note = credit_note("cn_1", [credit_note_line("cnli_1", 100, invoice_line="il_api")])
    note["lines"]["has_more"] = True
    serve_invoice(stripe_api, [line("il_api")], notes=(note,))
    stripe_api.get(
        f"{BASE}/v1/credit_notes/cn_1/lines",
        json=page("/v1/credit_notes/cn_1/lines", [credit_note_line("cnli_2", 200, meter="api_calls")]),
        match=[query(limit=100, starting_after="cnli_1")],
    )

    credits = [ln for ln in billing().invoice_records(INVOICE).lines if ln.kind == "credit"]

    assert [(c.line_id, c.meter, c.amount) for c in credits] == [
        ("cnli_1", "api_calls", Decimal("-1.00")),
        ("cnli_2", "api_calls", Decimal("-2.00")),
    ]


# -- metered units ------------------------------------------------------------------


def test_meter_event_summaries_are_summed_exactly_over_the_line_period(stripe_api):
    serve_invoice(stripe_api, [line("il_1")])
    serve_summaries(stripe_api, "mtr_api", OCT, NOV, [0.1, 0.2, 1])
    serve_summaries(stripe_api, "mtr_storage", OCT, NOV, [])

    metered = billing(METERED).invoice_records(INVOICE).metered

    api = next(m for m in metered if m.meter == "api_calls")
    assert api.quantity == Decimal("1.3") and str(api.quantity) == "1.3"
    assert (api.customer_id, api.period_start, api.period_end) == (CUSTOMER, at(OCT), at(NOV))


def test_meter_event_summaries_follow_pagination(stripe_api):
    serve_invoice(stripe_api, [line("il_1")])
    url = f"{BASE}/v1/billing/meters/mtr_api/event_summaries"
    first = page(url, [summary(0.1, OCT, NOV) | {"id": "mtrusg_1"}], has_more=True)
    stripe_api.get(
        url, body=json.dumps(first), match=[query(limit=100, customer=CUSTOMER, start_time=OCT, end_time=NOV)]
    )
    stripe_api.get(
        url,
        body=json.dumps(page(url, [summary(0.2, OCT, NOV)])),
        match=[query(limit=100, customer=CUSTOMER, start_time=OCT, end_time=NOV, starting_after="mtrusg_1")],
    )
    serve_summaries(stripe_api, "mtr_storage", OCT, NOV, [])

    metered = billing(METERED).invoice_records(INVOICE).metered

    assert next(m for m in metered if m.meter == "api_calls").quantity == Decimal("0.3")


def test_adjacent_proration_periods_are_asked_separately_on_minute_boundaries(stripe_api):
    change = OCT + 10 * 86400 + 37  # a plan change 37 s past a minute
    lines = [line("il_a", end=change, proration=True), line("il_b", start=change, proration=True)]
    serve_invoice(stripe_api, lines)
    serve_summaries(stripe_api, "mtr_api", OCT, change - 37, [10])
    serve_summaries(stripe_api, "mtr_api", change - 37, NOV, [20])
    serve_summaries(stripe_api, "mtr_storage", OCT, NOV, [])

    metered = billing(METERED).invoice_records(INVOICE).metered

    assert [(m.period_start, m.period_end, m.quantity) for m in metered if m.meter == "api_calls"] == [
        (at(OCT), at(change), Decimal(10)),
        (at(change), at(NOV), Decimal(20)),
    ]


def test_overlapping_line_periods_are_merged_so_usage_is_not_counted_twice():
    spans = [(at(OCT), at(NOV)), (at(OCT), at(OCT + 60)), (at(NOV), at(DEC)), (at(OCT), at(NOV))]
    assert merge_spans(spans) == [(at(OCT), at(NOV)), (at(NOV), at(DEC))]


def test_invoice_without_lines_is_measured_over_its_own_period(stripe_api):
    serve_invoice(stripe_api, [], period_start=OCT, period_end=NOV)
    serve_summaries(stripe_api, "mtr_api", OCT, NOV, [4])
    serve_summaries(stripe_api, "mtr_storage", OCT, NOV, [])

    records = billing(METERED).invoice_records(INVOICE)

    assert (records.period_start, records.period_end, records.lines) == (at(OCT), at(NOV), [])
    assert [(m.meter, m.quantity) for m in records.metered] == [("api_calls", Decimal(4)), ("storage", Decimal(0))]


# -- customers ----------------------------------------------------------------------


def test_customer_id_from_metadata_is_read_once_per_customer(stripe_api):
    customer = {
        "id": CUSTOMER,
        "object": "customer",
        "created": OCT,
        "livemode": False,
        "metadata": {"account_id": "acct-42"},
    }
    stripe_api.get(f"{BASE}/v1/customers/{CUSTOMER}", json=customer)
    serve_invoice(stripe_api, [line("il_1")])
    serve_summaries(stripe_api, "mtr_api", OCT, NOV, [3])
    serve_summaries(stripe_api, "mtr_storage", OCT, NOV, [])
    source = billing(METERED, '[stripe]\ncustomer_id_from = "metadata.account_id"\n')

    records = source.invoice_records(INVOICE)

    assert records.customer_id == "acct-42"
    assert {ln.customer_id for ln in records.lines} == {"acct-42"}
    assert {m.customer_id for m in records.metered} == {"acct-42"}  # asked of Stripe as cus_...
    assert source.customer_id(CUSTOMER) == "acct-42"
    assert len([c for c in stripe_api.calls if "/v1/customers/" in c.request.url]) == 1


def test_customer_without_the_metadata_key_is_unmapped(stripe_api):
    customer = {"id": CUSTOMER, "object": "customer", "created": OCT, "livemode": False, "metadata": {}}
    stripe_api.get(f"{BASE}/v1/customers/{CUSTOMER}", json=customer)
    serve_invoice(stripe_api, [line("il_1")])

    records = billing(customer_id_from="metadata.account_id").invoice_records(INVOICE)

    assert records.customer_id == "" and [ln.customer_id for ln in records.lines] == [""]


def test_invoice_without_customer_is_unmapped_and_not_measured(stripe_api):
    serve_invoice(stripe_api, [line("il_1")], customer=None)

    records = billing(METERED).invoice_records(INVOICE)

    assert records.customer_id == "" and records.metered == []


def test_unknown_customer_rule_is_a_config_error():
    with pytest.raises(ConfigError, match=r"stripe\.customer_id_from"):
        billing(customer_id_from="email")


# -- errors and retries -------------------------------------------------------------


def error_body(kind: str, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, **({"code": code} if code else {})}}


def test_rate_limit_is_retried_then_succeeds(stripe_api):
    url = f"{BASE}/v1/invoices/{INVOICE}"
    stripe_api.get(url, status=429, json=error_body("invalid_request_error", "Too many requests", "rate_limit"))
    serve_invoice(stripe_api, [line("il_1")])

    records = billing().invoice_records(INVOICE)

    assert [ln.line_id for ln in records.lines] == ["il_1"]
    assert len([c for c in stripe_api.calls if c.request.url == url]) == 2


@pytest.mark.parametrize("status", [500, 503, 409])
def test_server_errors_are_retried_until_the_attempts_run_out(stripe_api, status):
    url = f"{BASE}/v1/invoices/{INVOICE}"
    stripe_api.get(url, status=status, json=error_body("api_error", "Try later"), headers={"Request-Id": "req_500"})

    with pytest.raises(UpstreamUnavailable) as caught:
        billing(max_attempts=3).invoice_records(INVOICE)

    assert len(stripe_api.calls) == 3
    assert caught.value.request_id == "req_500"


def test_retries_stop_at_the_time_limit(stripe_api):
    stripe_api.get(f"{BASE}/v1/invoices/{INVOICE}", status=503, json=error_body("api_error", "Unavailable"))

    with pytest.raises(UpstreamUnavailable):
        billing(max_attempts=5, max_elapsed=0).invoice_records(INVOICE)

    assert len(stripe_api.calls) == 1


def test_should_retry_false_is_not_retried(stripe_api):
    headers = {"Request-Id": "req_no", "Stripe-Should-Retry": "false"}
    stripe_api.get(f"{BASE}/v1/invoices/{INVOICE}", status=500, json=error_body("api_error", "No"), headers=headers)

    with pytest.raises(UpstreamRejected) as caught:
        billing().invoice_records(INVOICE)

    assert len(stripe_api.calls) == 1
    assert caught.value.request_id == "req_no"


def test_should_retry_true_is_retried_whatever_the_status(stripe_api):
    url = f"{BASE}/v1/invoices/{INVOICE}"
    refused = error_body("invalid_request_error", "Request failed")
    stripe_api.get(url, status=400, json=refused, headers={"Stripe-Should-Retry": "true"})
    serve_invoice(stripe_api, [])

    assert billing().invoice_records(INVOICE).lines == []
    assert len([c for c in stripe_api.calls if c.request.url == url]) == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, error_body("invalid_request_error", "No such invoice", "resource_missing")),
        (401, error_body("invalid_request_error", "Invalid API Key provided")),
        (403, error_body("invalid_request_error", "The provided key does not have access")),
    ],
)
def test_client_errors_are_rejected_without_retry(stripe_api, status, body):
    stripe_api.get(f"{BASE}/v1/invoices/{INVOICE}", status=status, json=body, headers={"Request-Id": "req_4xx"})

    with pytest.raises(UpstreamRejected) as caught:
        billing().invoice_records(INVOICE)

    assert len(stripe_api.calls) == 1
    assert caught.value.request_id == "req_4xx" and f"HTTP {status}" in str(caught.value)


def test_connection_failure_is_unavailable(stripe_api):
    stripe_api.get(f"{BASE}/v1/invoices/{INVOICE}", body=requests.exceptions.ConnectionError("refused"))

    with pytest.raises(UpstreamUnavailable):
        billing(max_attempts=2).invoice_records(INVOICE)

    assert len(stripe_api.calls) == 2


def test_client_pins_the_api_version_and_leaves_retries_to_the_connector(stripe_api):
    stripe_api.get(f"{BASE}/v1/invoices/{INVOICE}", status=500, json=error_body("api_error", "Boom"))

    with pytest.raises(UpstreamUnavailable):
        billing(max_attempts=1).invoice_records(INVOICE)

    (call,) = stripe_api.calls  # the SDK retried nothing on its own
    assert call.request.headers["Stripe-Version"] == API_VERSION
    assert call.request.headers["Authorization"] == "Bearer sk_test_123"


def test_payload_without_a_needed_field_is_a_connector_error(stripe_api):
    broken = line("il_1")
    del broken["period"]
    stripe_api.get(f"{BASE}/v1/invoices/{INVOICE}", json=invoice())
    stripe_api.get(f"{BASE}/v1/invoices/{INVOICE}/lines", json=page(f"/v1/invoices/{INVOICE}/lines", [broken]))

    with pytest.raises(ConnectorError, match=f"invoice {INVOICE}: unexpected payload"):
        billing().invoice_records(INVOICE)


# -- sweep --------------------------------------------------------------------------


def test_recent_invoices_are_listed_across_pages(stripe_api):
    url = f"{BASE}/v1/invoices"
    newer = invoice() | {"id": "in_2", "created": NOV + 60, "status": "open"}
    older = invoice() | {"id": "in_1", "created": NOV + 30, "status": "draft"}
    stripe_api.get(
        url, json=page("/v1/invoices", [newer], has_more=True), match=[query(limit=100, **{"created[gt]": NOV})]
    )
    stripe_api.get(
        url, json=page("/v1/invoices", [older]), match=[query(limit=100, starting_after="in_2", **{"created[gt]": NOV})]
    )

    found = list(billing().list_recent_invoices(at(NOV)))

    assert found == [
        InvoiceSummary("in_2", CUSTOMER, "open", at(NOV + 60)),
        InvoiceSummary("in_1", CUSTOMER, "draft", at(NOV + 30)),
    ]


def test_a_catch_up_charge_written_back_reads_as_an_adjustment_of_its_own_period(stripe_api):
    """The invoice item Approve writes lands on a later invoice with the earlier key's period:
    it adjusts that key's amount and is never counted as usage of the later period."""
    catch_up = line(
        "il_catchup",
        None,
        start=OCT,
        end=NOV - 1,
        amount=4000,
        quantity="1",
        parent="invoice_item_details",
        metadata={"recon_kind": "catch_up", "recon_key": "recon-charge-abc", "meter": "api_calls"},
    )
    serve_invoice(stripe_api, [line("il_nov", start=NOV, end=DEC), catch_up])

    records = billing().invoice_records(INVOICE)

    (adjustment,) = [ln for ln in records.lines if ln.line_id == "il_catchup"]
    assert (adjustment.kind, adjustment.meter, adjustment.amount) == ("adjustment", "api_calls", Decimal("40.00"))
    assert (records.period_start, records.period_end, adjustment.period_start) == (at(NOV), at(DEC), at(OCT))


@pytest.mark.parametrize(
    ("major", "currency", "minor"),
    [("40.00", "usd", 4000), ("1500", "jpy", 1500), ("0.125", "kwd", 125), ("0.005", "usd", 1)],
)
def test_major_units_become_minor_units(major, currency, minor):
    assert to_minor_units(Decimal(major), currency) == minor
