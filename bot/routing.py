"""Routing a stored run: Slack alerts, tickets, webhooks, the watch-list and the period digest.

Runs after the run is stored (worker handler, `recon reconcile --route`, `recon route`).
Where each line goes is decided by rules.routing; this module delivers and records:

- Slack: one message per discrepancy key and destination, updated in place (`chat.update`)
  when a later run changes what it says, left alone when nothing changed; a key whose later
  line no longer routes to a channel gets its message there marked resolved.
- Tickets and webhooks: opened once per key and queue (the queue is searched first).
- Watch-list: timing items are opened, cleared, counted and escalated with the run (the
  store and bot.service); an item the run escalated is routed as the under-bill it has become.
- Digest: one message per period in `[routing] digest`, updated in place, with Sign off.

Everything sent is recorded in the store (`RoutingLog`), linked to its run and key. With
`dry_run`, nothing is sent or recorded: the answer says what would be.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.slack import SlackError, SlackPoster, SlackUnanswered, alert_blocks, alert_text, channel_of, digest_blocks
from bot.store import RoutingLog, Store
from bot.tickets import Queue, TicketRequest
from connectors.base import ConnectorError, InputError
from rules.config import Config, Owner
from rules.routing import Delivery, discrepancy_key, escalated, key_id, plan
from rules.routing import digest as digest_facts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sent:
    """What routing did (or would do) for one key at one destination."""

    to: str
    key: str
    what: str  # posted | updated | unchanged | resolved | opened | exists | watchlist | not configured | would ...
    summary: str


class RoutingIncomplete(RuntimeError):
    """Some deliveries failed (the rest went out); routing the run again retries only those."""

    def __init__(self, message: str, sent: list[Sent]) -> None:
        super().__init__(message)
        self.sent = sent


SEND_ERRORS = (SlackError, ConnectorError)
POSTING_MARGIN = 120  # seconds: a lost post is looked for from this long before its mark (clock skew)


@dataclass
class Outbox:
    """The clients routing sends through; a destination without one is reported, not sent."""

    slack: SlackPoster | None = None
    queues: dict[str, Queue] = field(default_factory=dict)  # "ticket:jira", "ticket:linear", "webhook:NAME"


def load_owners(config: Config, config_path: Path) -> dict[str, Owner]:
    """CSM owners: `[routing] owners_csv` (customer_id, slack, jira, linear), then `[routing.owners]`."""
    owners: dict[str, Owner] = {}
    if config.routing.owners_csv:
        path = config_path.parent / config.routing.owners_csv
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if "customer_id" not in (reader.fieldnames or []):
                    raise InputError(f"{path}: line 1: no customer_id column")
                for number, row in enumerate(reader, start=2):
                    if not row.get("customer_id"):
                        raise InputError(f"{path}: line {number}: customer_id: empty")
                    owners[row["customer_id"]] = Owner(**{k: (row.get(k) or None) for k in ("slack", "jira", "linear")})
        except OSError as exc:
            raise InputError(f"{path}: cannot be read: {exc.strerror}") from None
    return owners | config.routing.owners


class OwnerBook(Mapping[str, Owner]):
    """The owner map, falling back to a lookup (the billing customer's metadata) for customers
    it does not name; each lookup is made once, and one that fails counts as no owner."""

    def __init__(self, known: Mapping[str, Owner], lookup: Callable[[str], str | None] | None = None) -> None:
        self.known, self.lookup = dict(known), lookup
        self.found: dict[str, Owner | None] = {}

    def __getitem__(self, customer: str) -> Owner:
        if customer in self.known:
            return self.known[customer]
        if self.lookup is None:
            raise KeyError(customer)
        if customer not in self.found:
            try:
                slack = self.lookup(customer)
            except ConnectorError as exc:
                log.warning("owner of %s: lookup failed: %s", customer, exc)
                slack = None
            self.found[customer] = Owner(slack=slack) if slack else None
        owner = self.found[customer]
        if owner is None:
            raise KeyError(customer)
        return owner

    def __iter__(self) -> Iterator[str]:
        return iter(self.known)

    def __len__(self) -> int:
        return len(self.known)


def decision_text(decisions: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The decision as the message shows it: what, who and when (and who proposed it)."""
    final, proposed = decisions.get("final"), decisions.get("proposed")
    if final:
        words = {
            "approve": "Approved",
            "absorb": "Absorbed",
            "issue_credit": "Credit issued",
            "dismiss": "Dismissed",
            "sign_off": "Signed off",
        }
        what = words.get(final["action"], final["action"])
        text = f":white_check_mark: *{what}* by <@{final['user_id']}> at {final['decided_at']}"
        if proposed and proposed["user_id"] != final["user_id"]:
            text += f" (proposed by <@{proposed['user_id']}>)"
        return text
    if proposed:
        return (
            f":hourglass: *{proposed['action']}* proposed by <@{proposed['user_id']}> at {proposed['decided_at']}; "
            "above the approval limit: a second, different person must confirm"
        )
    return None


def _fingerprint(blocks: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(blocks, sort_keys=True).encode()).hexdigest()


class Router:
    def __init__(
        self,
        store: Store,
        config: Config,
        outbox: Outbox,
        *,
        owners: Mapping[str, Owner] | None = None,
        owner_lookup: Callable[[str], str | None] | None = None,
        public_url: str | None = None,
        dry_run: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.config, self.outbox = store, config, outbox
        self.log = RoutingLog(store)
        self.owners = OwnerBook(owners if owners is not None else config.routing.owners, owner_lookup)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.dry_run = dry_run
        self.clock = clock

    # -- a run -------------------------------------------------------------------------

    def route_run(self, run_id: str) -> list[Sent]:
        report = self.store.get_run(run_id)
        if report is None:
            raise InputError(f"run {run_id}: no such run")
        lines = list(report["lines"]) + self._escalations(run_id)
        deliveries = plan(lines, self.config.routes, self.owners, self.config.routing.segments)
        sent = [self._guarded(d.to, d.key, lambda d=d: self._deliver(d, run_id)) for d in deliveries]
        sent += self._resolve(lines, {(d.key, d.to) for d in deliveries}, run_id)
        if self.config.routing.digest:
            periods = sorted({line["period"] for line in report["lines"]})
            digest_to = self.config.routing.digest
            sent += [self._guarded(digest_to, f"digest|{p}", lambda p=p: self.post_digest(p, run_id)) for p in periods]
        failed = [s for s in sent if s.what.startswith("failed")]
        if failed:
            first = failed[0]
            raise RoutingIncomplete(
                f"run {run_id}: {len(failed)} of {len(sent)} deliveries failed; first {first.to}: {first.summary}", sent
            )
        return sent

    def _guarded(self, to: str, key: str, deliver: Any) -> Sent:
        """One delivery; a failure is logged and reported, and does not stop the others."""
        try:
            result: Sent = deliver()
        except SEND_ERRORS as exc:
            log.warning("route %s %s failed: %s", to, key, exc)
            return Sent(to, key, "failed", str(exc).splitlines()[0][:300])
        return result

    def _escalations(self, run_id: str) -> list[dict[str, Any]]:
        """Timing items this run escalated (bot.service re-checks the watch-list with each run)."""
        escalated_lines = []
        for item in self.store.escalated_in(run_id):
            opening = self.store.opening_line(item["customer_id"], item["meter"], item["period"])
            if opening is not None:
                escalated_lines.append(escalated(opening, item["cycles"]))
        return escalated_lines

    def _deliver(self, delivery: Delivery, run_id: str) -> Sent:
        if delivery.kind == "slack":
            return self._slack_alert(delivery, run_id)
        if delivery.kind == "watchlist":
            return Sent(delivery.to, delivery.key, "watchlist", alert_text(delivery.line))
        return self._ticket(delivery, run_id)

    # -- Slack ---------------------------------------------------------------------------

    def evidence_url(self, run_id: str) -> str | None:
        return f"{self.public_url}/api/runs/{run_id}" if self.public_url else None

    def _slack_alert(self, delivery: Delivery, run_id: str) -> Sent:
        line, key = delivery.line, delivery.key
        owner = delivery.owner.slack if delivery.owner else None
        blocks = alert_blocks(line, key, self.evidence_url(run_id), decision_text(self.log.decisions(key)), owner)
        return self._slack(delivery.to, key, alert_text(line), blocks, run_id)

    def _slack(self, to: str, key: str, text: str, blocks: list[dict[str, Any]], run_id: str) -> Sent:
        """Post once per key and destination; later, update in place only when the content changed."""
        fingerprint = _fingerprint(blocks)
        existing = self.log.message(key, to)
        if existing is not None and existing["fingerprint"] == fingerprint:
            return Sent(to, key, "unchanged", text)
        if self.dry_run:
            return Sent(to, key, "would update" if existing else "would post", text)
        if self.outbox.slack is None:
            return Sent(to, key, "not configured", text)
        slack = self.outbox.slack
        if existing is not None:
            posted = slack.update(existing["channel"], existing["ts"], text, blocks)
            self.log.save_message(key, to, posted.channel, posted.ts, run_id, fingerprint, text)
            return Sent(to, key, "updated", text)
        # Slack has no idempotency key: mark the post before the call, tag the message with its key,
        # and after a post whose answer was lost, find the message instead of posting it again.
        tag = {"key": key, "destination": to}
        since = self.log.posting(key, to)
        found = slack.find(channel_of(to), tag, since) if since is not None else None
        if found is not None:
            posted = slack.update(found.channel, found.ts, text, blocks)
            self.log.save_message(key, to, posted.channel, posted.ts, run_id, fingerprint, text)
            return Sent(to, key, "posted", text)
        self.log.mark_posting(key, to, f"{self.clock() - POSTING_MARGIN:.6f}")
        try:
            posted = slack.post(channel_of(to), text, blocks, tag)
        except SlackUnanswered:
            raise  # posted or not: the mark stays, and the next attempt looks for the message first
        except SlackError:
            self.log.clear_posting(key, to)  # Slack answered and refused: nothing was posted
            raise
        self.log.save_message(key, to, posted.channel, posted.ts, run_id, fingerprint, text)
        return Sent(to, key, "posted", text)

    def _resolve(self, lines: list[dict[str, Any]], routed: set[tuple[str, str]], run_id: str) -> list[Sent]:
        """A key posted earlier whose line no longer routes to that destination: say so there."""
        sent = []
        for line in lines:
            key = discrepancy_key(line)
            for message in self.log.messages(key):
                if (key, message["destination"]) in routed or not message["destination"].startswith("slack:"):
                    continue
                text = f"resolved: {line['customer_id']} · {line['meter']} · {line['period']} is now {line['class']}"
                blocks = [
                    {"type": "section", "text": {"type": "mrkdwn", "text": f":heavy_check_mark: {text}"}},
                    {"type": "context", "elements": [{"type": "mrkdwn", "text": line["cause"][:2900]}]},
                ]
                result = self._slack(message["destination"], key, text, blocks, run_id)
                sent.append(Sent(result.to, key, "resolved" if result.what == "updated" else result.what, text))
        return sent

    def refresh(self, key: str) -> list[Sent]:
        """Re-render every message of a key (after a decision) from its newest line."""
        if key.startswith("digest|"):
            return [self.post_digest(key.split("|", 1)[1], None)]
        found = self.store.latest_line(*key.rsplit("|", 2))
        if found is None:
            return []
        run_id, line = found
        decision = decision_text(self.log.decisions(key))
        owner = self.owners.get(line["customer_id"])
        sent = []
        for message in self.log.messages(key):
            blocks = alert_blocks(line, key, self.evidence_url(run_id), decision, owner.slack if owner else None)
            sent.append(self._slack(message["destination"], key, alert_text(line), blocks, run_id))
        return sent

    # -- digest --------------------------------------------------------------------------

    def post_digest(self, period: str, run_id: str | None) -> Sent:
        to = self.config.routing.digest or ""
        key = f"digest|{period}"
        facts = digest_facts(self.store.period_lines(period), self.log.writebacks(period), self.log.decided(period))
        signed = decision_text(self.log.decisions(key))
        url = f"{self.public_url}/api/runs?period={period}" if self.public_url else None
        blocks = digest_blocks(period, facts, key, url, signed)
        text = f"Billing reconciliation digest {period}: " + ", ".join(
            f"{k} {v['count']}" for k, v in facts["classes"].items()
        )
        existing = self.log.message(key, to)
        return self._slack(to, key, text, blocks, run_id or (existing["run_id"] if existing else "digest"))

    # -- tickets and webhooks -----------------------------------------------------------

    def _ticket(self, delivery: Delivery, run_id: str) -> Sent:
        line, key, to = delivery.line, delivery.key, delivery.to
        money = f"{line['delta_amount']} {line['currency'].upper()}"
        title = f"overage-recon {line['class']}: {line['customer_id']} {line['meter']} {line['period']} ({money})"
        existing = self.log.ticket(key, to)
        if existing is not None:
            return Sent(to, key, "exists", f"{existing['reference']} {title}")
        if self.dry_run:
            return Sent(to, key, "would open", title)
        queue = self.outbox.queues.get(to)
        if queue is None:
            log.warning("route %s: not configured; %s not sent", to, key)
            return Sent(to, key, "not configured", title)
        owner = delivery.owner
        assignee = (
            (owner.jira if to == "ticket:jira" else owner.linear if to == "ticket:linear" else None) if owner else None
        )
        request = TicketRequest(
            key=key,
            token=f"recon-{key_id(key)}",
            title=title,
            summary=_ticket_summary(line, owner),
            evidence=line,
            evidence_url=self.evidence_url(run_id),
            assignee=assignee,
        )
        ticket = queue.open(request)
        self.log.save_ticket(key, to, ticket.external_id, ticket.reference, ticket.url, run_id)
        return Sent(to, key, "opened", f"{ticket.reference} {title}")


def _ticket_summary(line: Mapping[str, Any], owner: Owner | None) -> list[str]:
    action = {
        "over_bill": "Credit task: the customer was invoiced more than they used; issue a credit (note or balance).",
        "under_bill": "Catch-up decision: the customer was invoiced less than they used.",
    }.get(line["class"], f"Discrepancy of class {line['class']}.")
    summary = [
        action,
        f"Customer {line['customer_id']}, meter {line['meter']}, period {line['period']}.",
        f"Billable units: raw {line['raw_units']}, metered {line['metered_units']}, invoiced {line['invoiced_units']}.",
        f"Delta: {line['delta_amount']} {line['currency'].upper()}; broke at {line['break_at']}: {line['cause']}",
    ]
    if owner and owner.slack:
        summary.append(f"CSM: {owner.slack}")
    return summary
