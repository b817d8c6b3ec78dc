"""What the worker does with each kind of platform event (a closed set; the rest are ignored).

Invoice events and credit notes reconcile the invoice they are about, always
re-reading it from the API: events arrive late, twice and out of order. A plan
change or a void is recorded; the proration it causes is judged from the lines of
the invoice that carries it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from bot.service import event_run_id, reconcile_invoice
from bot.signatures import InboundEvent, stripe_invoice_of
from bot.store import Claimed, Store
from bot.worker import Handler, Outcome
from connectors.base import InvoiceBilling
from connectors.raw import RawSource, raw_source
from rules.config import Config

log = logging.getLogger(__name__)

STRIPE_RECONCILE = ("invoice.created", "invoice.finalized", "invoice.updated", "credit_note.created", "invoice.swept")
STRIPE_RECORD_ONLY = ("invoice.voided", "customer.subscription.updated")


class NotConfigured(RuntimeError):
    """A platform's events arrived but its API key or the raw source is not configured."""


@dataclass
class Context:
    config: Config
    config_path: Path
    store: Store
    billing: dict[str, Callable[[], InvoiceBilling]]  # provider → connector factory

    def raw_source(self) -> RawSource:
        if not self.config.sources.raw:
            raise NotConfigured("sources.raw: no raw events source in the config")
        return raw_source(self.config.sources.raw, self.config_path.parent, self.config)

    def connector(self, provider: str) -> InvoiceBilling:
        factory = self.billing.get(provider)
        if factory is None:
            raise NotConfigured(f"{provider}: no API key configured")
        return factory()


def stripe_handlers(context: Context) -> dict[tuple[str, str], Handler]:
    def reconcile(claimed: Claimed) -> Outcome:
        invoice_id = stripe_invoice_of(json.loads(claimed.body))
        if not invoice_id:
            return Outcome("ignored")
        run_id = event_run_id(claimed.provider, claimed.event_id)
        billing = context.connector("stripe")
        reconcile_invoice(context.config, billing, context.raw_source(), context.store, invoice_id, run_id)
        return Outcome("done", run_id)

    def record(claimed: Claimed) -> Outcome:
        return Outcome("done")

    handlers = {("stripe", kind): reconcile for kind in STRIPE_RECONCILE}
    handlers.update({("stripe", kind): record for kind in STRIPE_RECORD_ONLY})
    return handlers


def sweep_stripe(context: Context, billing: object, since: datetime) -> int:
    """Enqueue every invoice created since `since` that no stored event or run covers."""
    added = 0
    for invoice in billing.list_recent_invoices(since):  # type: ignore[attr-defined]
        if context.store.covers("stripe", invoice.id):
            continue
        body = json.dumps(
            {"object": "event", "type": "invoice.swept", "data": {"object": {"object": "invoice", "id": invoice.id}}}
        )
        event = InboundEvent("stripe", f"sweep_{invoice.id}", "invoice.swept", None, body, subject=invoice.id)
        added += context.store.save_event(event)
        log.info("sweep: invoice %s had no event; enqueued", invoice.id)
    return added


SWEEP_WINDOW = timedelta(hours=72)
