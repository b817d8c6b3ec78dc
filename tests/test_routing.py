"""Routing a stored run: Slack (a local fake Web API), tickets and webhooks (`responses`), the
watch-list across two periods, and the decisions buttons make. The store, rules and router are real."""

from __future__ import annotations

import json

import pytest
import requests
import responses
from responses import matchers

from bot.routing import Outbox, Router, RoutingIncomplete
from bot.slack import Pacer, SlackPoster, channel_of
from bot.store import RoutingLog
from bot.tickets import JiraQueue, LinearQueue, WebhookSink, retrying, verify_webhook
from rules.config import parse_config
from rules.routing import discrepancy_key, key_id
from tests.book import SEP, config_text, event, line, metered, reconcile_book, write_book
from tests.slack_fake import FakeSlack

ROUTES = """
[[routes]]
class = "under_bill"
to = "slack:#revops"

[[routes]]
class = "over_bill"
to = "ticket:jira"

[[routes]]
class = "over_bill"
to = "slack:@csm"

[[routes]]
class = "timing"
to = "watchlist"

[routing]
digest = "slack:#revops-digest"

[routing.owners]
cus_b = { slack = "U0CSMBEE", jira = "5b10a2844c20165700ede21g" }
"""
UNDER = discrepancy_key({"customer_id": "cus_a", "meter": "api_calls", "period": "2026-10"})
OVER = discrepancy_key({"customer_id": "cus_b", "meter": "api_calls", "period": "2026-10"})
JIRA = "https://acme.atlassian.net"


def october(tmp_path, invoiced_a=(110, "120.00"), extra: str = ""):
    """cus_a under-billed by 40.00 (130 units used, 110 invoiced); cus_b over-billed by 20.00."""
    raw = [event("a1", 130_000), event("b1", 75_000, customer="cus_b")]
    meters = [metered(130_000), metered(75_000, customer="cus_b")]
    lines = [line(*invoiced_a), line(85, "70.00", customer="cus_b")]
    write_book(tmp_path, raw, meters, lines, config_text(extra=ROUTES + extra))


def make_router(store, tmp_path, slack: FakeSlack | None, queues=None, sleeps=None, dry_run=False) -> Router:
    config = parse_config((tmp_path / "recon.toml").read_text())
    poster = None
    if slack is not None:
        waits = sleeps if sleeps is not None else []
        clock = [0.0]
        poster = SlackPoster(
            "xoxb-test",
            slack.url,
            sleep=waits.append,
            pacer=Pacer(clock=lambda: clock[0], sleep=waits.append),
        )
    return Router(store, config, Outbox(poster, queues or {}), public_url="https://recon.example.com", dry_run=dry_run)


@pytest.fixture
def slack():
    with FakeSlack() as fake:
        yield fake


def test_an_alert_rate_limited_once_is_posted_after_retry_after(tmp_path, store, slack):
    october(tmp_path)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    slack.rate_limited = 1
    sleeps: list[float] = []

    sent = make_router(store, tmp_path, slack, sleeps=sleeps).route_run(run_id)

    assert 3.0 in sleeps  # waited Retry-After, through the injected sleep
    tries = [body for name, body in slack.calls if name == "chat.postMessage" and "cus_a" in body["text"]]
    assert [t["_answered"] for t in tries] == [429, 200]
    (alert,) = [s for s in sent if s.key == UNDER]
    assert (alert.to, alert.what) == ("slack:#revops", "posted")
    assert "cus_a" in alert.summary and "api_calls" in alert.summary


def test_alerts_show_units_side_by_side_money_class_place_and_buttons(tmp_path, store, slack):
    october(tmp_path)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    make_router(store, tmp_path, slack).route_run(run_id)

    (under,) = [b for b in slack.posted() if b["channel"] == "#revops"]
    text = json.dumps(under["blocks"])
    for fact in ("*Raw* 130", "*Metered* 130", "*Invoiced* 110", "40.00 USD", "under_bill", "billing"):
        assert fact in text
    assert f"https://recon.example.com/api/runs/{run_id}" in text
    buttons = under["blocks"][-1]["elements"]
    assert [(b["action_id"], b["text"]["text"].split()[0], b["value"]) for b in buttons] == [
        ("approve", "Approve", UNDER),
        ("absorb", "Absorb", UNDER),
    ]
    (csm,) = [b for b in slack.posted() if b["channel"] == "U0CSMBEE"]  # the over-bill, to its CSM
    assert [b["action_id"] for b in csm["blocks"][-1]["elements"]] == ["issue_credit", "dismiss"]


def test_a_rerun_posts_nothing_new_and_a_changed_key_is_updated_in_place(tmp_path, store, slack):
    october(tmp_path)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    router = make_router(store, tmp_path, slack)
    router.route_run(run_id)
    posts = len(slack.posted())

    again = router.route_run(run_id)

    assert {s.what for s in again} == {"unchanged", "not configured"}  # no Jira client in this test
    assert len(slack.posted()) == posts and not slack.posted("chat.update")

    october(tmp_path, invoiced_a=(100, "100.00"))  # a later run finds cus_a under-billed by 60.00
    second = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    sent = router.route_run(second)

    assert len(slack.posted()) == posts
    (update,) = [u for u in slack.posted("chat.update") if "cus_a" in u["text"]]
    message = RoutingLog(store).message(UNDER, "slack:#revops")
    assert (update["channel"], update["ts"]) == (message["channel"], message["ts"])
    assert "60.00 USD" in update["text"]
    assert ("slack:#revops", "updated") in {(s.to, s.what) for s in sent if s.key == UNDER}


def test_a_key_that_now_matches_has_its_message_marked_resolved(tmp_path, store, slack):
    october(tmp_path)
    router = make_router(store, tmp_path, slack)
    router.route_run(reconcile_book(tmp_path, "2026-10", store)["run_id"])
    october(tmp_path, invoiced_a=(130, "160.00"))

    sent = router.route_run(reconcile_book(tmp_path, "2026-10", store)["run_id"])

    assert ("slack:#revops", "resolved") in {(s.to, s.what) for s in sent if s.key == UNDER}
    (update,) = [u for u in slack.posted("chat.update") if "cus_a" in u["text"]]
    assert "is now match" in update["text"]


def test_the_digest_counts_by_class_once_per_period_and_offers_sign_off(tmp_path, store, slack):
    october(tmp_path)
    router = make_router(store, tmp_path, slack)
    router.route_run(reconcile_book(tmp_path, "2026-10", store)["run_id"])
    router.route_run(reconcile_book(tmp_path, "2026-10", store)["run_id"])

    (digest,) = [b for b in slack.posted() if b["channel"] == "#revops-digest"]
    text = json.dumps(digest["blocks"])
    assert "*under_bill*: 1 \\u00b7 40.00 USD" in text and "*over_bill*: 1 \\u00b7 -20.00 USD" in text
    assert "*Still open*: 2 \\u00b7 60.00 USD" in text
    assert digest["blocks"][-1]["elements"][0]["action_id"] == "sign_off"


def test_dry_run_says_where_each_finding_would_go_and_sends_nothing(tmp_path, store, slack):
    october(tmp_path)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]

    sent = make_router(store, tmp_path, slack, dry_run=True).route_run(run_id)

    assert {(s.to, s.what) for s in sent} == {
        ("slack:#revops", "would post"),
        ("ticket:jira", "would open"),
        ("slack:@U0CSMBEE", "would post"),
        ("slack:#revops-digest", "would post"),
    }
    assert slack.calls == []
    assert RoutingLog(store).messages(UNDER) == []


def test_a_failing_destination_does_not_stop_the_others_and_is_retried_alone(tmp_path, store, slack):
    october(tmp_path)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    router = make_router(store, tmp_path, slack)
    slack.missing.add("#revops")

    with pytest.raises(RoutingIncomplete, match="slack:#revops: Slack chat.postMessage: channel_not_found") as failed:
        router.route_run(run_id)

    assert {(s.to, s.what) for s in failed.value.sent} >= {("slack:#revops", "failed"), ("slack:@U0CSMBEE", "posted")}
    slack.missing.clear()
    again = router.route_run(run_id)
    assert {(s.to, s.what) for s in again if s.to.startswith("slack:")} == {
        ("slack:#revops", "posted"),
        ("slack:@U0CSMBEE", "unchanged"),
        ("slack:#revops-digest", "unchanged"),
    }

    assert not slack.posted("conversations.history")  # a refusal clears the mark: nothing to look for


@pytest.mark.parametrize(("key", "to"), [(UNDER, "slack:#revops"), (OVER, "slack:@U0CSMBEE")])  # by name; a DM
def test_a_post_whose_answer_was_lost_is_found_in_the_channel_not_posted_again(tmp_path, store, slack, key, to):
    october(tmp_path)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    router = make_router(store, tmp_path, slack)
    slack.lose.add(channel_of(to))

    with pytest.raises(RoutingIncomplete, match=f"{to}: Slack chat.postMessage: no answer"):
        router.route_run(run_id)
    assert RoutingLog(store).message(key, to) is None  # the answer never came: nothing recorded
    again = router.route_run(run_id)

    made = [b for name, b in slack.calls if name == "chat.postMessage" and b["channel"] == channel_of(to)]
    assert len(made) == 1  # the retry found the message in the channel's history instead
    (found,) = [
        (channel, ts)
        for (channel, ts), m in slack.messages.items()
        if m.get("metadata", {}).get("event_payload") == {"key": key, "destination": to}
    ]
    saved = RoutingLog(store).message(key, to)
    assert (saved["channel"], saved["ts"]) == found
    assert (to, "posted") in {(s.to, s.what) for s in again}
    assert RoutingLog(store).posting(key, to) is None
    posts = len(slack.posted())
    assert {s.what for s in router.route_run(run_id) if s.to == to} == {"unchanged"}
    assert len(slack.posted()) == posts


def test_a_post_marked_but_never_made_is_posted_after_looking(tmp_path, store, slack):
    october(tmp_path)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    slack.names["revops"] = slack.channel_id("#revops")  # the channel exists; nothing was posted to it
    RoutingLog(store).mark_posting(UNDER, "slack:#revops", "1790000000.000000")  # a worker died before the call

    sent = make_router(store, tmp_path, slack).route_run(run_id)

    assert [b["channel"] for b in slack.posted("conversations.history")] == [slack.channel_id("#revops")]
    assert len([b for b in slack.posted() if b["channel"] == "#revops"]) == 1
    assert ("slack:#revops", "posted") in {(s.to, s.what) for s in sent if s.key == UNDER}


# -- tickets and webhooks -------------------------------------------------------------------


def jira_issue(key: str = "BILL-12", issue_id: str = "10068") -> dict:
    return {"id": issue_id, "key": key, "self": f"{JIRA}/rest/api/3/issue/{issue_id}"}


def test_a_jira_ticket_is_created_once_across_a_timed_out_create(tmp_path, store):
    october(tmp_path)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    token = f"recon-{key_id(OVER)}"
    search = f"{JIRA}/rest/api/3/search/jql"
    with responses.RequestsMock() as jira:
        label = matchers.query_param_matcher({"jql": f'labels = "{token}"', "fields": "summary", "maxResults": "1"})
        jira.get(search, json={"issues": [], "isLast": True}, match=[label])
        created = jira.post(f"{JIRA}/rest/api/3/issue", body=requests.exceptions.ReadTimeout("read timed out"))
        found = {"issues": [jira_issue() | {"fields": {"summary": "overage-recon over_bill"}}], "isLast": True}
        jira.get(search, json=found, match=[label])
        queue = JiraQueue(JIRA, "ops@acme.test", "jira-token", "BILL", retry=retrying(wait_initial=0, wait_max=0))
        router = make_router(store, tmp_path, None, {"ticket:jira": queue})

        router.route_run(run_id)
        router.route_run(run_id)  # a re-run: the stored ticket is enough, no call at all

        assert created.call_count == 1
        sent = json.loads(jira.calls[1].request.body)["fields"]
    ticket = RoutingLog(store).ticket(OVER, "ticket:jira")
    assert (ticket["reference"], ticket["url"], ticket["run_id"]) == ("BILL-12", f"{JIRA}/browse/BILL-12", run_id)
    assert sent["labels"] == ["overage-recon", token]
    assert sent["assignee"] == {"accountId": "5b10a2844c20165700ede21g"}
    assert sent["description"]["type"] == "doc" and sent["description"]["version"] == 1
    evidence = next(n for n in sent["description"]["content"] if n["type"] == "codeBlock")
    assert json.loads(evidence["content"][0]["text"])["delta_amount"] == "-20.00"


def test_a_linear_issue_is_created_once_across_a_timed_out_create(tmp_path, store):
    october(tmp_path, extra='\n[routing.linear]\nteam_id = "9cfb482a-81e3-4154-b5b9-2c805e70a02d"\n')
    (tmp_path / "recon.toml").write_text((tmp_path / "recon.toml").read_text().replace("ticket:jira", "ticket:linear"))
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    url = "http://linear.test/graphql"
    issue = {
        "id": "a4f5b2c1-0d3e-4f6a-8b7c-9d0e1f2a3b4c",
        "identifier": "ENG-7",
        "url": "https://linear.app/acme/issue/ENG-7",
    }
    with responses.RequestsMock() as linear:
        searched = matchers.json_params_matcher(
            {"variables": {"marker": f"recon-key: recon-{key_id(OVER)}"}}, strict_match=False
        )
        linear.post(url, json={"data": {"issues": {"nodes": []}}}, match=[searched])
        create = linear.post(url, body=requests.exceptions.ReadTimeout("read timed out"))
        linear.post(url, json={"data": {"issues": {"nodes": [issue]}}}, match=[searched])
        queue = LinearQueue(
            "lin_api_test", "9cfb482a-81e3-4154-b5b9-2c805e70a02d", url, retry=retrying(wait_initial=0, wait_max=0)
        )
        router = make_router(store, tmp_path, None, {"ticket:linear": queue})

        router.route_run(run_id)

        assert create.call_count == 1
        mutation = json.loads(linear.calls[1].request.body)
    assert "issueCreate" in mutation["query"]
    assert mutation["variables"]["input"]["teamId"] == "9cfb482a-81e3-4154-b5b9-2c805e70a02d"
    assert f"recon-key: recon-{key_id(OVER)}" in mutation["variables"]["input"]["description"]
    assert RoutingLog(store).ticket(OVER, "ticket:linear")["reference"] == "ENG-7"


def test_the_webhook_sink_signs_what_it_sends(tmp_path, store):
    october(tmp_path, extra='\n[routing.webhooks]\nfinance = "https://hooks.acme.test/recon"\n')
    (tmp_path / "recon.toml").write_text(
        (tmp_path / "recon.toml").read_text().replace("ticket:jira", "webhook:finance")
    )
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    with responses.RequestsMock() as sink:
        hook = sink.post("https://hooks.acme.test/recon", json={"received": True})
        queue = WebhookSink("finance", "https://hooks.acme.test/recon", "whsec_sink", clock=lambda: 1_790_812_800)
        make_router(store, tmp_path, None, {"webhook:finance": queue}).route_run(run_id)
        request = hook.calls[0].request

    signature = request.headers["X-Recon-Signature"]
    assert verify_webhook(request.body, signature, "whsec_sink", now=1_790_812_900)
    assert not verify_webhook(request.body.replace(b"-20.00", b"-2.00"), signature, "whsec_sink", now=1_790_812_900)
    assert not verify_webhook(request.body, signature, "another-secret", now=1_790_812_900)
    assert not verify_webhook(request.body, signature, "whsec_sink", now=1_790_812_800 + 301)
    body = json.loads(request.body)
    assert (body["key"], body["line"]["class"], request.headers["X-Recon-Delivery"]) == (
        OVER,
        "over_bill",
        f"recon-{key_id(OVER)}",
    )


# -- the watch-list across two periods ---------------------------------------------------------


def umbrella(tmp_path, october_metered: int, october_invoiced: int, escalate_after: int = 1):
    """20,000 September calls reached the store on 5 October, after the 48 h grace."""
    raw = [
        event("u1", 80_000, "2026-09-10T12:00:00Z", customer="cus_u"),
        event("u2", 20_000, "2026-09-29T12:00:00Z", "2026-10-05T09:00:00Z", customer="cus_u"),
        event("u3", 60_000, "2026-10-10T12:00:00Z", customer="cus_u"),
    ]
    meters = [metered(80_000, customer="cus_u", span=SEP), metered(october_metered, customer="cus_u")]
    lines = [
        line(80, "60.00", customer="cus_u", span=SEP),
        line(october_invoiced, f"{(october_invoiced - 50) * 2}.00", customer="cus_u"),
    ]
    period = f'\n[period]\ntimezone = "UTC"\ngrace = "48h"\nescalate_after = {escalate_after}\n'
    config = config_text(extra=ROUTES).replace('[period]\ntimezone = "UTC"\ngrace = "48h"\n', period)
    write_book(tmp_path, raw, meters, lines, config)


def test_a_timing_item_clears_when_the_next_periods_invoice_carries_the_late_units(tmp_path, store, slack):
    umbrella(tmp_path, october_metered=80_000, october_invoiced=80)
    router = make_router(store, tmp_path, slack)
    september = reconcile_book(tmp_path, "2026-09", store)
    assert [ln["class"] for ln in september["lines"]] == ["timing"]
    router.route_run(september["run_id"])
    assert [(i["status"], i["cleared_by"]) for i in store.watchlist(include_closed=True)] == [("open", None)]

    october_run = reconcile_book(tmp_path, "2026-10", store)
    router.route_run(october_run["run_id"])

    (item,) = store.watchlist(include_closed=True)
    assert item["status"] == "cleared"
    assert item["cleared_by"] == {
        "run_id": october_run["run_id"],
        "invoice_id": "in_cus_u_2026-10",
        "period": "2026-10",
    }
    assert not [b for b in slack.posted() if "cus_u" in b["text"] and b["channel"] == "#revops"]


def test_a_timing_item_not_cleared_escalates_to_an_under_bill(tmp_path, store, slack):
    umbrella(tmp_path, october_metered=60_000, october_invoiced=60)
    router = make_router(store, tmp_path, slack)
    router.route_run(reconcile_book(tmp_path, "2026-09", store)["run_id"])

    october_run = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    sent = router.route_run(october_run)
    router.route_run(october_run)  # the same period again counts no second cycle, posts nothing new

    (item,) = store.watchlist(include_closed=True)
    assert (item["status"], item["cycles"], item["escalated_by"]) == ("escalated", 1, october_run)
    key = "cus_u|api_calls|2026-09"
    assert ("slack:#revops", "posted") in {(s.to, s.what) for s in sent if s.key == key}
    (alert,) = [b for b in slack.posted() if b["channel"] == "#revops" and "cus_u" in b["text"]]
    assert alert["text"].startswith("under_bill: cus_u · api_calls · 2026-09")
    assert [b["action_id"] for b in alert["blocks"][-1]["elements"]] == ["approve", "absorb"]


def test_escalation_waits_for_the_configured_number_of_cycles(tmp_path, store):
    umbrella(tmp_path, october_metered=60_000, october_invoiced=60, escalate_after=2)
    router = make_router(store, tmp_path, None)
    router.route_run(reconcile_book(tmp_path, "2026-09", store)["run_id"])
    router.route_run(reconcile_book(tmp_path, "2026-10", store)["run_id"])

    (item,) = store.watchlist(include_closed=True)
    assert (item["status"], item["cycles"]) == ("open", 1)


# -- who owns a customer ---------------------------------------------------------------------


def test_the_csm_comes_from_the_customers_stripe_metadata_when_the_map_has_none(tmp_path, store, stripe_api):
    from connectors.stripe import StripeBilling, make_client
    from tests.stripe_fake import BASE

    october(tmp_path)
    text = (tmp_path / "recon.toml").read_text()
    text = text[: text.index("[routing.owners]")].replace("[routing]\n", '[routing]\nowner_metadata_key = "csm"\n')
    (tmp_path / "recon.toml").write_text(text)
    config = parse_config(text)
    run_id = reconcile_book(tmp_path, "2026-10", store)["run_id"]
    customer = {"object": "customer", "metadata": {}}
    stripe_api.get(f"{BASE}/v1/customers/cus_a", json=customer | {"id": "cus_a"})
    stripe_api.get(f"{BASE}/v1/customers/cus_b", json=customer | {"id": "cus_b", "metadata": {"csm": "U0FROMMETA"}})

    def lookup(customer_id: str) -> str | None:
        return StripeBilling(make_client("sk_test_1", BASE), config).customer_metadata(customer_id).get("csm")

    sent = Router(store, config, Outbox(), owner_lookup=lookup, dry_run=True).route_run(run_id)

    assert ("slack:@U0FROMMETA", "would post") in {(s.to, s.what) for s in sent if s.key == OVER}
    assert sorted(c.request.url for c in stripe_api.calls) == [
        f"{BASE}/v1/customers/cus_a",
        f"{BASE}/v1/customers/cus_b",
    ]


def test_owners_from_a_csv_and_the_config_map_wins(tmp_path):
    from bot.routing import load_owners
    from rules.config import Owner

    (tmp_path / "csm.csv").write_text("customer_id,slack,jira,linear\ncus_a,U0ANNA,acc-anna,\ncus_b,U0OLD,,\n")
    config = parse_config(config_text(extra='[routing]\nowners_csv = "csm.csv"\n[routing.owners]\ncus_b = "U0NEW"\n'))

    owners = load_owners(config, tmp_path / "recon.toml")

    assert owners == {"cus_a": Owner("U0ANNA", "acc-anna", None), "cus_b": Owner("U0NEW")}
    (tmp_path / "csm.csv").write_text("customer_id,slack\n,U0X\n")
    with pytest.raises(Exception, match=r"csm.csv: line 2: customer_id: empty"):
        load_owners(config, tmp_path / "recon.toml")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[routing]\ndigest = "ticket:jira"\n', "routing.digest: must be slack:#channel or slack:@user"),
        ("[routing.jira]\nprojekt = 'BILL'\n", "routing.jira.projekt: unknown key"),
        ('[approvals]\nsecond_approver_above = "lots"\n', "approvals.second_approver_above: must be a decimal number"),
        ("[routing.owners]\ncus_a = { slack = 'U1', email = 'x' }\n", "routing.owners.cus_a.email: unknown key"),
    ],
)
def test_routing_config_errors_name_the_key(extra, message):
    from rules.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config(config_text(extra=extra))
