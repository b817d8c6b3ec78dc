"""`POST /slack/actions` end to end: a signed button click is stored and acknowledged, the worker
decides, writes back to Stripe once under the key's idempotency key, and updates the message.

Slack is a local fake Web API; Stripe is faked with `responses` using the shapes of
/work/shared/fixtures/stripe. The app, store, worker, router and connector are the real ones.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import responses
from responses import matchers

from bot.actions import Decider
from bot.app import create_app
from bot.config import Settings
from bot.handlers import Context, slack_handlers
from bot.store import RoutingLog, Store
from bot.worker import Worker
from connectors.stripe import StripeBilling, make_client
from rules.config import parse_config
from rules.routing import writeback_key
from tests.book import reconcile_book
from tests.slack_fake import FakeSlack, block_actions, signed_form
from tests.stripe_fake import BASE, invoice
from tests.test_routing import OVER, UNDER, make_router, october

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stripe"
NOW = datetime.now(UTC) + timedelta(days=1)
OCT_START, NOV_START = 1790812800, 1793491200


def shared(name: str) -> dict:
    return json.loads((SHARED / f"{name}.json").read_text())


@pytest.fixture
def slack():
    with FakeSlack() as fake:
        yield fake


def world(tmp_path, slack, extra: str = ""):
    """October routed to Slack: cus_a under-billed by 40.00, cus_b over-billed by 20.00."""
    october(tmp_path, extra=extra)
    url = f"sqlite:///{tmp_path / 'actions.db'}"
    store = Store.open(url)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    router = make_router(store, tmp_path, slack)
    router.route_run(run_id)
    config = parse_config((tmp_path / "recon.toml").read_text())

    def stripe_writeback() -> StripeBilling:
        return StripeBilling(make_client("sk_test_1", BASE), config, wait_initial=0, wait_max=0)

    context = Context(
        config, tmp_path / "recon.toml", store, {}, router, Decider(store, config, router, {"stripe": stripe_writeback})
    )
    app = create_app(Settings(database_url=url, slack_signing_secret=SECRET))
    return app, context


def click(app, action: str, key: str, user: str = "U0APPROVER", trigger: str = "t1", secret: str = SECRET, at=None):
    body, headers = signed_form(block_actions(action, key, user=user, trigger=trigger), secret, at)
    return app.test_client().post("/slack/actions", data=body, headers=headers)


def work(context: Context) -> None:
    job = Worker(context.store, slack_handlers(context), clock=lambda: NOW)
    while job.run_once():
        pass


def serve_charge(stripe_api, status: str = "draft"):
    """The invoice the key came from, and the one invoice item Approve may create."""
    stripe_api.get(
        f"{BASE}/v1/invoices/in_cus_a_2026-10",
        json=invoice(customer="cus_a", status=status) | {"id": "in_cus_a_2026-10"},
    )
    params = {
        "customer": "cus_a",
        "currency": "usd",
        "amount": "4000",
        "description": "Usage catch-up: api_calls 2026-10 (20 units not billed)",
        "metadata[recon_kind]": "catch_up",
        "metadata[recon_key]": writeback_key("charge", UNDER),
        "metadata[meter]": "api_calls",
        "period[start]": str(OCT_START),
        "period[end]": str(NOV_START - 1),
    }
    if status == "draft":
        params["invoice"] = "in_cus_a_2026-10"
    item = shared("invoiceitem") | {"customer": "cus_a", "amount": 4000, "id": "ii_recon_catchup"}
    return stripe_api.post(
        f"{BASE}/v1/invoiceitems",
        json=item,
        match=[
            matchers.urlencoded_params_matcher(params),
            matchers.header_matcher({"Idempotency-Key": writeback_key("charge", UNDER)}),
        ],
    )


def test_a_signed_click_twice_writes_one_invoice_item_and_names_the_decision(tmp_path, slack, stripe_api):
    app, context = world(tmp_path, slack)
    created = serve_charge(stripe_api)

    first, second = click(app, "approve", UNDER, trigger="t1"), click(app, "approve", UNDER, trigger="t2")

    assert (first.status_code, first.data, second.status_code) == (200, b"", 200)
    assert [e["status"] for e in context.store.events()] == ["pending", "pending"]  # acknowledged before any work
    work(context)

    assert created.call_count == 1
    assert [e["status"] for e in context.store.events()] == ["done", "done"]
    trail = RoutingLog(context.store).trail(UNDER)
    (written,) = trail["writebacks"]
    assert (written["platform_id"], written["kind"], written["amount"]) == ("ii_recon_catchup", "charge", "40.00")
    assert [(d["stage"], d["action"], d["user_id"]) for d in trail["decisions"]] == [("final", "approve", "U0APPROVER")]
    update = [u for u in slack.posted("chat.update") if "cus_a" in u["text"]][-1]
    message = RoutingLog(context.store).message(UNDER, "slack:#revops")
    assert (update["channel"], update["ts"]) == (message["channel"], message["ts"])
    shown = json.dumps(update["blocks"])
    assert "Approved" in shown and "<@U0APPROVER>" in shown
    assert not [b for b in update["blocks"] if b["type"] == "actions"]


def test_approval_on_a_finalized_invoice_leaves_the_charge_pending_for_the_next_one(tmp_path, slack, stripe_api):
    app, context = world(tmp_path, slack)
    created = serve_charge(stripe_api, status="open")  # the matcher requires no `invoice` parameter

    click(app, "approve", UNDER)
    work(context)

    assert created.call_count == 1


def test_a_bad_missing_or_stale_signature_is_refused_and_nothing_is_stored(tmp_path, slack):
    app, context = world(tmp_path, slack)

    assert click(app, "approve", UNDER, secret="not-the-secret").status_code == 401
    assert click(app, "approve", UNDER, at=int(time.time()) - 301).status_code == 401
    body, _ = signed_form(block_actions("approve", UNDER), SECRET)
    unsigned = app.test_client().post(
        "/slack/actions", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert unsigned.status_code == 401
    assert context.store.events() == []


def test_above_the_limit_a_second_different_person_must_confirm(tmp_path, slack, stripe_api):
    app, context = world(tmp_path, slack, extra='\n[approvals]\nsecond_approver_above = "10.00"\n')
    created = serve_charge(stripe_api)

    click(app, "approve", UNDER, user="U0MAKER", trigger="t1")
    click(app, "approve", UNDER, user="U0MAKER", trigger="t2")  # the maker cannot also be the checker
    work(context)

    assert created.call_count == 0
    decisions = RoutingLog(context.store).decisions(UNDER)
    assert list(decisions) == ["proposed"]
    pending = [u for u in slack.posted("chat.update") if "cus_a" in u["text"]][-1]
    assert "proposed by <@U0MAKER>" in json.dumps(pending["blocks"])

    click(app, "confirm", UNDER, user="U0CHECKER", trigger="t3")
    work(context)

    assert created.call_count == 1
    final = RoutingLog(context.store).decisions(UNDER)["final"]
    assert (final["action"], final["user_id"]) == ("approve", "U0CHECKER")
    shown = json.dumps([u for u in slack.posted("chat.update") if "cus_a" in u["text"]][-1]["blocks"])
    assert "<@U0CHECKER>" in shown and "proposed by <@U0MAKER>" in shown


def test_absorb_records_who_let_it_go_and_writes_nothing(tmp_path, slack, stripe_api):
    app, context = world(tmp_path, slack)

    click(app, "absorb", UNDER, user="U0LEAD")
    work(context)

    trail = RoutingLog(context.store).trail(UNDER)
    assert [(d["action"], d["user_id"]) for d in trail["decisions"]] == [("absorb", "U0LEAD")]
    assert trail["writebacks"] == []


def test_a_charge_whose_answer_was_lost_is_found_on_stripe_not_written_again(tmp_path, slack, stripe_api):
    """Stripe made the item but every answer was lost; by the retry the draft was finalized,
    so the same key would now send other parameters (which Stripe refuses) or, a day later,
    make a second item. The retry looks for the key's item first and records it."""
    app, context = world(tmp_path, slack)
    stripe_api.get(
        f"{BASE}/v1/invoices/in_cus_a_2026-10",
        json=invoice(customer="cus_a", status="draft") | {"id": "in_cus_a_2026-10"},
    )
    lost = stripe_api.post(f"{BASE}/v1/invoiceitems", body=requests.ConnectionError("answer lost"))
    began = datetime.now(UTC)
    click(app, "approve", UNDER)
    work(context)
    [event] = context.store.events()
    assert (event["status"], event["attempts"]) == ("pending", 1)  # to be retried
    log = RoutingLog(context.store)
    key = writeback_key("charge", UNDER)
    assert log.writing(key)["facts"] == {
        "customer_id": "cus_a",
        "invoice_id": "in_cus_a_2026-10",
        "amount": "40.00",
        "currency": "usd",
    }
    assert log.writeback(key) is None
    attempts = lost.call_count
    october(tmp_path, invoiced_a=(130, "160.00"))  # meanwhile a newer run finds the key billed in full
    newer = reconcile_book(tmp_path, "2026-10", context.store)
    assert [ln["delta_amount"] for ln in newer["lines"] if ln["customer_id"] == "cus_a"] == ["0.00"]

    stripe_api.replace(
        responses.GET,
        f"{BASE}/v1/invoices/in_cus_a_2026-10",
        json=invoice(customer="cus_a", status="open") | {"id": "in_cus_a_2026-10"},
    )
    made = shared("invoiceitem") | {"id": "ii_made_then", "customer": "cus_a", "metadata": {"recon_key": key}}
    other = shared("invoiceitem") | {"id": "ii_other", "customer": "cus_a", "metadata": {}}
    listed = stripe_api.get(
        f"{BASE}/v1/invoiceitems",
        json={"object": "list", "url": "/v1/invoiceitems", "has_more": False, "data": [other, made]},
        match=[matchers.query_param_matcher({"customer": "cus_a", "limit": "100"}, strict_match=False)],
    )
    later = Worker(context.store, slack_handlers(context), clock=lambda: NOW + timedelta(hours=2))
    while later.run_once():
        pass

    assert listed.call_count == 1 and lost.call_count == attempts  # looked, and wrote nothing more
    assert [e["status"] for e in context.store.events()] == ["done"]
    written = log.writeback(key)
    assert (written["platform_id"], written["amount"]) == ("ii_made_then", "40.00")  # what was sent, not the new line
    assert log.writing(key) is None
    # only what was made since the write began (less ten minutes for the clocks) is listed
    created = int(listed.calls[0].request.params["created[gte]"])
    assert int(began.timestamp()) - 601 <= created <= int(datetime.now(UTC).timestamp()) - 600


def test_a_credit_whose_answer_was_lost_is_not_given_twice_once_the_invoice_is_final(tmp_path, slack, stripe_api):
    """The first attempt, on a draft, credited the balance; the retry, the invoice now open,
    would write a credit note: it finds the balance credit first."""
    app, context = world(tmp_path, slack)
    stripe_api.get(
        f"{BASE}/v1/invoices/in_cus_b_2026-10",
        json=invoice(customer="cus_b", status="draft") | {"id": "in_cus_b_2026-10"},
    )
    balance = f"{BASE}/v1/customers/cus_b/balance_transactions"
    lost = stripe_api.post(balance, body=requests.ConnectionError("answer lost"))
    click(app, "issue_credit", OVER, user="U0CSMBEE")
    work(context)
    key = writeback_key("credit", OVER)
    assert RoutingLog(context.store).writing(key) is not None

    stripe_api.replace(
        responses.GET,
        f"{BASE}/v1/invoices/in_cus_b_2026-10",
        json=invoice(customer="cus_b", status="open") | {"id": "in_cus_b_2026-10", "amount_remaining": 5000},
    )
    notes = stripe_api.get(
        f"{BASE}/v1/credit_notes",
        json={"object": "list", "url": "/v1/credit_notes", "has_more": False, "data": []},
        match=[matchers.query_param_matcher({"customer": "cus_b", "limit": "100"}, strict_match=False)],
    )
    txn = shared("customer_balance_transaction") | {"id": "cbtxn_made_then", "metadata": {"recon_key": key}}
    credits = stripe_api.get(
        balance,
        json={"object": "list", "url": "/v1/customers/cus_b/balance_transactions", "has_more": False, "data": [txn]},
    )
    attempts = lost.call_count
    later = Worker(context.store, slack_handlers(context), clock=lambda: NOW + timedelta(hours=2))
    while later.run_once():
        pass

    assert (notes.call_count, credits.call_count, lost.call_count) == (1, 1, attempts)
    assert RoutingLog(context.store).writeback(key)["platform_id"] == "cbtxn_made_then"


def test_issue_credit_writes_one_credit_note_on_the_finalized_invoice(tmp_path, slack, stripe_api):
    app, context = world(tmp_path, slack)
    stripe_api.get(
        f"{BASE}/v1/invoices/in_cus_b_2026-10",
        json=invoice(customer="cus_b", status="paid") | {"id": "in_cus_b_2026-10", "amount_remaining": 0},
    )
    note = stripe_api.post(
        f"{BASE}/v1/credit_notes",
        json=shared("credit_note") | {"id": "cn_recon_credit", "invoice": "in_cus_b_2026-10", "amount": 2000},
        match=[
            matchers.urlencoded_params_matcher(
                {
                    "invoice": "in_cus_b_2026-10",
                    "lines[0][type]": "custom_line_item",
                    "lines[0][description]": "Usage credit: api_calls 2026-10 (-10 units billed over usage)",
                    "lines[0][quantity]": "1",
                    "lines[0][unit_amount]": "2000",
                    "memo": "Usage credit: api_calls 2026-10 (-10 units billed over usage)",
                    "metadata[recon_kind]": "credit",
                    "metadata[recon_key]": writeback_key("credit", OVER),
                    "metadata[meter]": "api_calls",
                    "credit_amount": "2000",
                }
            ),
            matchers.header_matcher({"Idempotency-Key": writeback_key("credit", OVER)}),
        ],
    )

    click(app, "issue_credit", OVER, user="U0CSMBEE", trigger="t1")
    click(app, "issue_credit", OVER, user="U0CSMBEE", trigger="t2")
    work(context)

    assert note.call_count == 1
    assert RoutingLog(context.store).writeback(writeback_key("credit", OVER))["platform_id"] == "cn_recon_credit"


def test_sign_off_closes_the_period_digest_naming_who_signed(tmp_path, slack):
    app, context = world(tmp_path, slack)

    click(app, "sign_off", "digest|2026-10", user="U0CFO")
    work(context)

    (decision,) = RoutingLog(context.store).trail("digest|2026-10")["decisions"]
    assert (decision["action"], decision["user_id"]) == ("sign_off", "U0CFO")
    assert decision["run_id"] == RoutingLog(context.store).message("digest|2026-10", "slack:#revops-digest")["run_id"]
    (update,) = [u for u in slack.posted("chat.update") if "digest" in u["text"]]
    shown = json.dumps(update["blocks"])
    assert "Signed off" in shown and "<@U0CFO>" in shown
    assert not [b for b in update["blocks"] if b["type"] == "actions"]
