"""With Stripe and Orb both configured, a decision is written back to the platform that billed the key."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import responses

from bot.config import Settings
from bot.runtime import build_worker
from bot.signatures import InboundEvent
from bot.store import RoutingLog
from rules.config import parse_config
from tests.book import RAW, write_csv
from tests.orb_fake import BASE, CUSTOMER, INVOICE, NOV, OCT, invoice, line_item, page, serve_invoice, serve_usage
from tests.slack_fake import FakeSlack, block_actions
from tests.test_orb_flow import CONFIG as ORB_CONFIG
from tests.test_orb_webhooks import invoice_issued

CONFIG = (
    ORB_CONFIG
    + """
[[routes]]
class = "under_bill"
to = "slack:#revops"
"""
)
NOW = datetime.now(UTC) + timedelta(days=1)


def test_approve_on_an_orb_customers_break_writes_to_orb_even_with_a_stripe_key(tmp_path):
    (tmp_path / "recon.toml").write_text(CONFIG)
    rows = [[f"e{i}", CUSTOMER, "api_calls", f"2026-10-{i + 1:02d}T10:00:00Z", "10", ""] for i in range(15)]
    write_csv(tmp_path / "raw.csv", RAW, rows)
    with FakeSlack() as slack, responses.RequestsMock(assert_all_requests_are_fired=False) as platforms:
        platforms.add_passthru(slack.url)
        serve_invoice(platforms, invoice([line_item("li_api", quantity=120, subtotal="140.00")]))
        serve_usage(platforms, OCT, NOV, {"metric_api": [100, 20]})
        settings = Settings(
            config_path=tmp_path / "recon.toml",
            database_url=f"sqlite:///{tmp_path / 'recon.db'}",
            orb_api_key="orb_test",
            orb_api_base=BASE,
            stripe_api_key="sk_test_1",
            stripe_api_base="http://stripe.test",  # any call to Stripe would find nothing here
            slack_bot_token="xoxb-test",
            slack_api_url=slack.url,
        )
        context, job = build_worker(settings, parse_config(CONFIG))
        job.clock = lambda: NOW
        issued = invoice_issued("evt_1", "invoice.issued")
        context.store.save_event(InboundEvent("orb", "evt_1", "invoice.issued", None, issued, INVOICE))
        while job.run_once():
            pass
        platforms.get(f"{BASE}/invoices", json=page([invoice([], id="in_draft", status="draft")]))
        platforms.post(f"{BASE}/invoice_line_items", json={"id": "li_catch_up"})
        click = json.dumps(block_actions("approve", f"{CUSTOMER}|api_calls|2026-10"))
        context.store.save_event(InboundEvent("slack", "act_1", "block_actions", None, click))
        while job.run_once():
            pass

        assert [(e["type"], e["status"]) for e in context.store.events()] == [
            ("invoice.issued", "done"),
            ("block_actions", "done"),
        ]
        posts = [c.request for c in platforms.calls if c.request.method == "POST"]
        assert [p.url for p in posts] == [f"{BASE}/invoice_line_items"]
        assert not [c for c in platforms.calls if "stripe.test" in c.request.url]
        [written] = RoutingLog(context.store).writebacks()
        assert (written["platform"], written["platform_id"], written["amount"]) == ("orb", "li_catch_up", "60.00")
