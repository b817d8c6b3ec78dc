"""Stripe end to end: a signed event in, the worker re-reads the invoice, a stored run out.

Stripe is faked at the HTTP boundary only (`responses`); the store, worker,
connector and core are the real ones.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from responses import matchers

from bot.app import create_app
from bot.config import Settings
from bot.handlers import Context, stripe_handlers, sweep_stripe
from bot.service import event_run_id
from bot.signatures import InboundEvent
from bot.store import Store
from bot.worker import Worker
from connectors.stripe import StripeBilling, make_client
from rules.config import parse_config
from tests.book import RAW, write_csv
from tests.stripe_fake import BASE, CUSTOMER, INVOICE, NOV, OCT, invoice, line, page, serve_invoice, serve_summaries
from tests.test_webhooks import SECRET, invoice_created, sign

CONFIG = """
[sources]
raw = "raw.csv"

[[meters]]
name = "api_calls"
unit_price = "2.00"
included = 50
stripe_price = "price_api"
stripe_meter = "mtr_api"
"""
NOW = datetime.now(UTC) + timedelta(days=1)  # every stored event is ready by then


@pytest.fixture
def world(tmp_path, database_url):
    """Config, raw events (150 calls by the Stripe customer in October) and a store."""
    (tmp_path / "recon.toml").write_text(CONFIG)
    rows = [[f"e{i}", CUSTOMER, "api_calls", f"2026-10-{i + 1:02d}T10:00:00Z", "10", ""] for i in range(15)]
    write_csv(tmp_path / "raw.csv", RAW, rows)
    url = database_url
    config = parse_config(CONFIG)
    billing = {"stripe": lambda: StripeBilling(make_client("sk_test_1", BASE), config, wait_initial=0, wait_max=0)}
    context = Context(config, tmp_path / "recon.toml", Store.open(url), billing)
    return context


def worker(context: Context, clock=lambda: NOW, **kwargs) -> Worker:
    return Worker(context.store, stripe_handlers(context), clock=clock, **kwargs)


def enqueue(context: Context, event_id: str, kind: str = "invoice.created") -> None:
    body = invoice_created(event_id, kind)
    payload = json.loads(body)
    payload["data"]["object"]["id"] = INVOICE
    context.store.save_event(InboundEvent("stripe", event_id, kind, None, json.dumps(payload), INVOICE))


def serve_under_billed_invoice(stripe_api) -> None:
    """Stripe metered 120 of the 150 calls and invoiced 120 (70 over the 50 included)."""
    serve_invoice(stripe_api, [line("il_api", quantity="120", amount=14000)])
    serve_summaries(stripe_api, "mtr_api", OCT, NOV, [100, 20])


def test_signed_invoice_created_in_stored_run_out(world, stripe_api, tmp_path):
    app = create_app(Settings(database_url=world.store.url, stripe_webhook_secrets=(SECRET,)))
    body = json.loads(invoice_created("evt_e2e"))
    body["data"]["object"]["id"] = INVOICE
    text = json.dumps(body)
    assert (
        app.test_client().post("/webhooks/stripe", data=text, headers={"Stripe-Signature": sign(text)}).status_code
        == 200
    )
    serve_under_billed_invoice(stripe_api)

    assert worker(world).run_once()

    client = app.test_client()
    (run,) = client.get(f"/api/runs?invoice_id={INVOICE}").json["runs"]
    assert (run["status"], run["customer_id"], run["period"]) == ("done", CUSTOMER, "2026-10")
    (verdict,) = client.get(f"/api/runs/{run['run_id']}").json["lines"]
    assert (verdict["class"], verdict["break_at"], verdict["delta_amount"]) == ("under_bill", "metering", "60.00")
    assert verdict["evidence"]["invoice_line_ids"] == ["il_api"]
    assert world.store.events()[0]["status"] == "done"


def test_a_worker_that_dies_after_claiming_leaves_the_event_to_another(world, stripe_api):
    enqueue(world, "evt_1")
    assert world.store.claim("dead-worker", NOW, timedelta(seconds=30)) is not None
    assert not worker(world, clock=lambda: NOW + timedelta(seconds=29)).run_once()  # lease still held
    serve_under_billed_invoice(stripe_api)

    assert worker(world, clock=lambda: NOW + timedelta(seconds=31)).run_once()

    assert world.store.count("runs") == 1
    assert world.store.run_status(event_run_id("stripe", "evt_1")) == "done"


def test_a_run_cut_short_is_redone_under_the_same_id(world, stripe_api, tmp_path):
    enqueue(world, "evt_1")
    raw = tmp_path / "raw.csv"
    good = raw.read_text()
    raw.write_text(good + f"e99,{CUSTOMER},api_calls,not-a-time,1,\n")  # the run starts, then the raw read fails
    serve_under_billed_invoice(stripe_api)
    job = worker(world, backoff=timedelta(0))
    assert job.run_once()
    assert world.store.run_status(event_run_id("stripe", "evt_1")) == "running"
    raw.write_text(good)
    serve_under_billed_invoice(stripe_api)

    assert job.run_once()

    assert [r["status"] for r in world.store.list_runs({})] == ["done"]
    assert world.store.events()[0]["attempts"] == 2


def test_events_in_any_order_and_twice_make_one_run_each(world, stripe_api):
    enqueue(world, "evt_final", "invoice.finalized")
    enqueue(world, "evt_created", "invoice.created")
    enqueue(world, "evt_created", "invoice.created")  # redelivered
    for _ in range(2):
        serve_under_billed_invoice(stripe_api)
    job = worker(world)
    while job.run_once():
        pass
    statuses = {r["event_id"]: r["status"] for r in world.store.events()}
    assert statuses == {"evt_final": "done", "evt_created": "done"}
    assert world.store.count("runs") == 2


def test_unknown_types_are_ignored_without_a_run(world):
    enqueue(world, "evt_ping", "customer.created")
    assert worker(world).run_once()
    assert world.store.events()[0]["status"] == "ignored"
    assert world.store.count("runs") == 0


def test_failures_back_off_then_park_the_event_dead_and_replay_revives_it(world, stripe_api):
    enqueue(world, "evt_1")
    stripe_api.get(
        f"{BASE}/v1/invoices/{INVOICE}",
        status=404,
        json={"error": {"type": "invalid_request_error", "message": "No such invoice"}},
    )
    clock = [NOW]
    job = worker(world, clock=lambda: clock[0], max_attempts=2, backoff=timedelta(seconds=30))
    assert job.run_once()
    (row,) = world.store.events()
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "404" in row["last_error"]
    assert not job.run_once()  # backing off
    clock[0] += timedelta(seconds=31)
    stripe_api.get(
        f"{BASE}/v1/invoices/{INVOICE}",
        status=404,
        json={"error": {"type": "invalid_request_error", "message": "No such invoice"}},
    )
    assert job.run_once()
    assert world.store.events()[0]["status"] == "dead"

    assert world.store.replay([]) == 1
    assert world.store.events()[0]["status"] == "pending"


def test_the_sweep_enqueues_invoices_no_event_covers(world, stripe_api):
    enqueue(world, "evt_known")
    listed = [invoice() | {"id": INVOICE, "created": NOV}, invoice() | {"id": "in_lost", "created": NOV + 60}]
    stripe_api.get(f"{BASE}/v1/invoices", json=page("/v1/invoices", listed))
    billing = world.billing["stripe"]()

    assert sweep_stripe(world, billing, NOW - timedelta(hours=72)) == 1

    assert [(r["event_id"], r["type"]) for r in world.store.events()][1] == ("sweep_in_lost", "invoice.swept")


def hold_world(world, tmp_path, extra: str):
    config = parse_config(CONFIG + extra)
    billing = {"stripe": lambda: StripeBilling(make_client("sk_test_1", BASE), config, wait_initial=0, wait_max=0)}
    return Context(config, tmp_path / "recon.toml", world.store, billing)


def test_a_material_break_on_a_draft_holds_it_when_switched_on(world, stripe_api, tmp_path):
    context = hold_world(world, tmp_path, '\n[stripe]\nhold_drafts = true\nhold_min_amount = "50.00"\n')
    enqueue(context, "evt_1")
    serve_invoice(stripe_api, [line("il_api", quantity="120", amount=14000)], status="draft")
    serve_summaries(stripe_api, "mtr_api", OCT, NOV, [100, 20])
    run_id = event_run_id("stripe", "evt_1")
    held = stripe_api.post(
        f"{BASE}/v1/invoices/{INVOICE}",
        json=invoice(status="draft", auto_advance=False),
        match=[
            matchers.urlencoded_params_matcher(
                {
                    "auto_advance": "false",
                    "metadata[recon_hold]": f"overage-recon run {run_id}: api_calls: under_bill 60.00 usd",
                    "metadata[recon_run_id]": run_id,
                }
            ),
            matchers.header_matcher({"Idempotency-Key": f"recon-hold-{INVOICE}-{run_id}"}),
        ],
    )

    assert worker(context).run_once()

    assert held.call_count == 1


@pytest.mark.parametrize("extra", ["", '\n[stripe]\nhold_drafts = true\nhold_min_amount = "60.01"\n'])
def test_drafts_are_not_held_by_default_or_below_the_threshold(world, stripe_api, tmp_path, extra):
    context = hold_world(world, tmp_path, extra)
    enqueue(context, "evt_1")
    serve_invoice(stripe_api, [line("il_api", quantity="120", amount=14000)], status="draft")
    serve_summaries(stripe_api, "mtr_api", OCT, NOV, [100, 20])

    assert worker(context).run_once()  # an unexpected POST would fail: responses knows no such URL

    assert world.store.events()[0]["status"] == "done"


def test_an_invoice_event_routes_its_run_once_however_often_it_is_processed(world, stripe_api, tmp_path):
    from bot.routing import Outbox, Router
    from bot.slack import Pacer, SlackPoster
    from bot.store import RoutingLog
    from tests.slack_fake import FakeSlack

    routes = '\n[[routes]]\nclass = "under_bill"\nto = "slack:#revops"\n'
    config = parse_config(CONFIG + routes)
    with FakeSlack() as slack:
        poster = SlackPoster("xoxb-test", slack.url, sleep=lambda s: None, pacer=Pacer(sleep=lambda s: None))
        router = Router(world.store, config, Outbox(poster))
        context = Context(config, tmp_path / "recon.toml", world.store, world.billing, router)
        enqueue(context, "evt_1")
        enqueue(context, "evt_1b", "invoice.finalized")
        for _ in range(2):
            serve_under_billed_invoice(stripe_api)
        job = worker(context)
        while job.run_once():
            pass

        (alert,) = slack.posted()
    assert alert["channel"] == "#revops" and alert["text"].startswith(f"under_bill: {CUSTOMER} · api_calls · 2026-10")
    message = RoutingLog(world.store).message(f"{CUSTOMER}|api_calls|2026-10", "slack:#revops")
    assert message["run_id"] in {event_run_id("stripe", "evt_1"), event_run_id("stripe", "evt_1b")}
