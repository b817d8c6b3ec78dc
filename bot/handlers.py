"""What the worker does with each kind of platform event (a closed set; the rest are ignored).

Each platform is a `Platform`: which event types reconcile the invoice they are
about, which are only recorded, how to find the invoice in an event, and what a
sweep event looks like. One generic handler reconciles, always re-reading the
invoice from the API: events arrive late, twice and out of order. A plan change or
a void is recorded; the proration it causes is judged from the lines of the
invoice that carries it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import NotConfigured
from bot.service import event_run_id, reconcile_invoice
from bot.signatures import InboundEvent, orb_invoice_of, stripe_invoice_of
from bot.store import Claimed, Store
from bot.worker import Handler, Outcome
from connectors.base import InvoiceBilling, NothingToReconcile
from connectors.raw import RawSource, raw_source
from rules.config import Config

if TYPE_CHECKING:
    from bot.actions import Decider
    from bot.routing import Router

log = logging.getLogger(__name__)
SWEPT = "invoice.swept"  # our own event type: an invoice the sweep found with no event


@dataclass
class Context:
    config: Config
    config_path: Path
    store: Store
    billing: dict[str, Callable[[], InvoiceBilling]]  # provider → connector factory
    router: Router | None = None  # routes each finished run (Slack, tickets, watch-list, digest)
    decider: Decider | None = None  # acts on Slack button clicks

    def raw_source(self) -> RawSource:
        if not self.config.sources.raw:
            raise NotConfigured("sources.raw: no raw events source in the config")
        return raw_source(self.config.sources.raw, self.config_path.parent, self.config)

    def connector(self, provider: str) -> InvoiceBilling:
        factory = self.billing.get(provider)
        if factory is None:
            raise NotConfigured(f"{provider}: no API key configured")
        return factory()


@dataclass(frozen=True)
class Platform:
    """What the worker needs to know of one platform's events."""

    name: str
    reconcile: tuple[str, ...]  # event types whose invoice is reconciled
    record_only: tuple[str, ...]  # event types kept as done, with no run
    invoice_of: Callable[[dict[str, Any]], str | None]
    swept: Callable[[str], dict[str, Any]]  # the body of a sweep event for an invoice


STRIPE = Platform(
    name="stripe",
    reconcile=("invoice.created", "invoice.finalized", "invoice.updated", "credit_note.created", SWEPT),
    record_only=("invoice.voided", "customer.subscription.updated"),
    invoice_of=stripe_invoice_of,
    swept=lambda invoice_id: {
        "object": "event",
        "type": SWEPT,
        "data": {"object": {"object": "invoice", "id": invoice_id}},
    },
)
ORB = Platform(
    name="orb",
    reconcile=(
        "invoice.issued",
        "invoice.issued_summary",  # summary webhooks: no line items, the invoice is fetched anyway
        "invoice.edited",
        "credit_note.issued",
        "credit_note.marked_as_void",
        SWEPT,
    ),
    # A plan change's proration is judged from the lines of the invoice that carries it.
    record_only=("subscription.plan_changed", "invoice.manually_marked_as_void"),
    invoice_of=orb_invoice_of,
    swept=lambda invoice_id: {"id": f"sweep_{invoice_id}", "type": SWEPT, "invoice": {"id": invoice_id}},
)
PLATFORMS = {p.name: p for p in (STRIPE, ORB)}


def platform_handlers(context: Context, platform: Platform) -> dict[tuple[str, str], Handler]:
    """One platform's handler table, built from the one reconcile handler."""

    def reconcile(claimed: Claimed) -> Outcome:
        invoice_id = platform.invoice_of(json.loads(claimed.body, parse_float=Decimal))
        if not invoice_id:
            return Outcome("ignored")
        run_id = event_run_id(claimed.provider, claimed.event_id)
        billing = context.connector(platform.name)
        raw = context.raw_source()
        try:
            reconcile_invoice(context.config, billing, raw, context.store, invoice_id, run_id, platform.name)
        except NothingToReconcile as exc:
            log.info("event %s: %s", claimed.event_id, exc)
            return Outcome("ignored")
        if context.router is not None:
            context.router.route_run(run_id)  # idempotent: a retried event re-sends nothing already sent
        return Outcome("done", run_id)

    def record(claimed: Claimed) -> Outcome:
        return Outcome("done")

    handlers = {(platform.name, kind): reconcile for kind in platform.reconcile}
    handlers.update({(platform.name, kind): record for kind in platform.record_only})
    return handlers


def slack_handlers(context: Context) -> dict[tuple[str, str], Handler]:
    """Slack interactivity stored by `POST /slack/actions`: button clicks."""

    def block_actions(claimed: Claimed) -> Outcome:
        if context.decider is None:
            raise NotConfigured("slack: SLACK_BOT_TOKEN is not set; cannot act on a button click")
        what = context.decider.handle(json.loads(claimed.body), claimed.event_id)
        log.info("slack action %s: %s", claimed.event_id, what)
        return Outcome("done")

    return {("slack", "block_actions"): block_actions}


def all_handlers(context: Context) -> dict[tuple[str, str], Handler]:
    """Every platform's handlers and Slack's: events of a platform with no key fail and are retried."""
    handlers = slack_handlers(context)
    for platform in PLATFORMS.values():
        handlers.update(platform_handlers(context, platform))
    return handlers


def stripe_handlers(context: Context) -> dict[tuple[str, str], Handler]:
    return platform_handlers(context, STRIPE)


def sweep(context: Context, platform: Platform, billing: InvoiceBilling, since: datetime) -> int:
    """Enqueue every invoice listed since `since` that no stored event or run covers."""
    added = 0
    for invoice in billing.list_recent_invoices(since):
        if context.store.covers(platform.name, invoice.id):
            continue
        body = json.dumps(platform.swept(invoice.id))
        event = InboundEvent(platform.name, f"sweep_{invoice.id}", SWEPT, None, body, subject=invoice.id)
        added += context.store.save_event(event)
        log.info("sweep: %s invoice %s had no event; enqueued", platform.name, invoice.id)
    return added


def sweep_stripe(context: Context, billing: InvoiceBilling, since: datetime) -> int:
    return sweep(context, STRIPE, billing, since)


SWEEP_WINDOW = timedelta(hours=72)
