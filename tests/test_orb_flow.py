"""Orb end to end: a signed event in, the worker re-reads the invoice from Orb, a stored run out.

Orb is faked at the HTTP boundary only (`responses`); the app, store, worker,
connector and core are the real ones.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from bot.app import create_app
from bot.config import Settings
from bot.handlers import ORB, Context, all_handlers, sweep
from bot.service import event_run_id
from bot.signatures import InboundEvent
from bot.store import Store
from bot.worker import Worker
from connectors.orb import OrbBilling
from rules.config import parse_config
from tests.book import RAW, write_csv
from tests.orb_fake import BASE, CUSTOMER, INVOICE, NOV, OCT, invoice, line_item, page, serve_invoice, serve_usage
from tests.test_orb_webhooks import SECRET, invoice_issued, sign

CONFIG = """
[sources]
raw = "raw.csv"

[[meters]]
name = "api_calls"
unit_price = "2.00"
included = 50
orb_metric = "metric_api"
"""
NOW = datetime.now(UTC) + timedelta(days=1)


@pytest.fixture
def world(tmp_path):
    """Config, raw events (150 calls by `acme` in October) and a store."""
    (tmp_path / "recon.toml").write_text(CONFIG)
    rows = [[f"e{i}", CUSTOMER, "api_calls", f"2026-10-{i + 1:02d}T10:00:00Z", "10", ""] for i in range(15)]
    write_csv(tmp_path / "raw.csv", RAW, rows)
    config = parse_config(CONFIG)
    billing = {"orb": lambda: OrbBilling(config, "orb_test", BASE, wait_initial=0, wait_max=0, sleep=lambda s: None)}
    return Context(config, tmp_path / "recon.toml", Store.open(f"sqlite:///{tmp_path / 'flow.db'}"), billing)


def worker(context: Context) -> Worker:
    return Worker(context.store, all_handlers(context), clock=lambda: NOW)


def enqueue(context: Context, event_id: str, kind: str) -> None:
    body = invoice_issued(event_id, kind)
    context.store.save_event(InboundEvent("orb", event_id, kind, None, body, INVOICE))


def serve_under_billed_invoice(orb_api) -> None:
    """Orb metered 120 of the 150 calls and invoiced 120 (70 over the 50 included, 140.00)."""
    line = line_item("li_api", quantity=120, subtotal="140.00")
    serve_invoice(orb_api, invoice([line]))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [100, 20]})


def test_signed_invoice_issued_in_stored_run_out(world, orb_api):
    app = create_app(Settings(database_url=world.store.url, orb_webhook_secrets=(SECRET,)))
    body = invoice_issued("evt_e2e")
    assert app.test_client().post("/webhooks/orb", data=body, headers=sign(body)).status_code == 200
    serve_under_billed_invoice(orb_api)

    assert worker(world).run_once()

    client = app.test_client()
    (run,) = client.get(f"/api/runs?invoice_id={INVOICE}").json["runs"]
    assert (run["status"], run["customer_id"], run["period"]) == ("done", CUSTOMER, "2026-10")
    assert run["run_id"] == event_run_id("orb", "evt_e2e")
    (verdict,) = client.get(f"/api/runs/{run['run_id']}").json["lines"]
    assert (verdict["class"], verdict["break_at"], verdict["delta_amount"]) == ("under_bill", "metering", "60.00")
    assert (verdict["raw_units"], verdict["metered_units"], verdict["invoiced_units"]) == ("150", "120", "120")
    assert verdict["evidence"]["invoice_line_ids"] == ["li_api"]
    assert world.store.events()[0]["status"] == "done"


def test_an_edited_draft_with_a_credit_is_a_credit(world, orb_api):
    enqueue(world, "evt_edit", "invoice.edited")
    line = line_item("li_api", quantity=100, subtotal="100.00", credits_applied="30.00")
    serve_invoice(orb_api, invoice([line], status="draft"))
    serve_usage(orb_api, OCT, NOV, {"metric_api": [100]})
    write_csv(
        world.config_path.parent / "raw.csv",
        RAW,
        [[f"e{i}", CUSTOMER, "api_calls", f"2026-10-{i + 1:02d}T10:00:00Z", "10", ""] for i in range(10)],
    )

    assert worker(world).run_once()

    [row] = world.store.backend.query("SELECT run_id FROM run_customers")
    [verdict] = world.store.get_run(row["run_id"])["lines"]
    assert (verdict["class"], verdict["delta_amount"]) == ("credit", "30.00")
    assert sorted(verdict["evidence"]["invoice_line_ids"]) == ["li_api", "li_api:credits_applied"]


@pytest.mark.parametrize(
    ("kind", "status"), [("subscription.plan_changed", "done"), ("resource_event.test", "ignored")]
)
def test_plan_changes_are_recorded_and_other_types_ignored_without_a_run(world, kind, status):
    world.store.save_event(InboundEvent("orb", "evt_x", kind, None, json.dumps({"id": "evt_x", "type": kind})))

    assert worker(world).run_once()

    assert world.store.events()[0]["status"] == status
    assert world.store.count("runs") == 0


def test_the_sweep_enqueues_orb_invoices_no_event_covers(world, orb_api):
    enqueue(world, "evt_known", "invoice.issued")
    listed = [invoice(id=INVOICE), invoice(id="in_lost")]
    orb_api.get(f"{BASE}/invoices", json=page(listed))

    assert sweep(world, ORB, world.billing["orb"](), NOW - timedelta(hours=72)) == 1

    assert [(r["event_id"], r["type"]) for r in world.store.events()][1] == ("sweep_in_lost", "invoice.swept")


def test_an_invoice_with_no_line_items_is_ignored_not_retried(world, orb_api):
    enqueue(world, "evt_empty", "invoice.issued")
    serve_invoice(orb_api, invoice([], invoice_source="one_off", subscription=None))

    assert worker(world).run_once()

    (row,) = world.store.events()
    assert (row["status"], row["attempts"]) == ("ignored", 1)
    assert world.store.run_status(event_run_id("orb", "evt_empty")) is None
