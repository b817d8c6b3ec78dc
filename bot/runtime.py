"""Wiring the worker from settings: the store, the platform connectors and the handlers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bot.actions import Decider
from bot.config import Settings
from bot.handlers import PLATFORMS, SWEEP_WINDOW, Context, all_handlers, sweep
from bot.routing import Outbox, Router, load_owners
from bot.schedule import schedule_handlers
from bot.slack import SlackPoster
from bot.store import Store
from bot.tickets import JiraQueue, LinearQueue, Queue, WebhookSink
from bot.worker import Worker, at_most_every
from connectors.base import InvoiceBilling
from connectors.orb import OrbBilling
from connectors.pacing import Pace, pace_for
from connectors.stripe import StripeBilling, make_client
from rules.config import Config


def connectors(settings: Settings, config: Config) -> dict[str, Callable[[], InvoiceBilling]]:
    """A connector factory for each platform whose API key is set."""
    billing: dict[str, Callable[[], InvoiceBilling]] = {}
    if settings.stripe_api_key:
        key, base = settings.stripe_api_key, settings.stripe_api_base
        stripe_pace = pace(settings, config, "stripe", key)
        billing["stripe"] = lambda: StripeBilling(make_client(key, base), config, pace=stripe_pace)
    if settings.orb_api_key:
        orb_key, orb_base = settings.orb_api_key, settings.orb_api_base
        orb_pace = pace(settings, config, "orb", orb_key)
        billing["orb"] = lambda: OrbBilling(config, orb_key, orb_base, pace=orb_pace)
    return billing


def pace(settings: Settings, config: Config, platform: str, api_key: str) -> Pace:
    """One pace per platform account for the whole process (or, with RECON_REDIS_URL, for
    every process sharing that Redis): the account is named by a hash of its key."""
    account = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return pace_for(platform, account, config.platforms.get(platform, {}), settings.redis_url)


def build_context(settings: Settings, config: Config) -> Context:
    billing = connectors(settings, config)
    store = Store.open(settings.database_url)
    router = build_router(settings, config, store)
    decider = Decider(store, config, router, billing) if settings.slack_bot_token else None  # type: ignore[arg-type]
    return Context(config, settings.config_path, store, billing, router, decider)


def build_outbox(settings: Settings, config: Config) -> Outbox:
    """A client for each destination whose credentials are set."""
    queues: dict[str, Queue] = {}
    routing = config.routing
    if settings.jira_base_url and settings.jira_email and settings.jira_api_token and routing.jira_project:
        queues["ticket:jira"] = JiraQueue(
            settings.jira_base_url,
            settings.jira_email,
            settings.jira_api_token,
            routing.jira_project,
            routing.jira_issue_type,
        )
    if settings.linear_api_key and routing.linear_team:
        queues["ticket:linear"] = LinearQueue(settings.linear_api_key, routing.linear_team, settings.linear_api_url)
    for name, url in routing.webhooks.items():
        queues[f"webhook:{name}"] = WebhookSink(name, url, settings.webhook_sink_secret)
    slack = SlackPoster(settings.slack_bot_token, settings.slack_api_url) if settings.slack_bot_token else None
    return Outbox(slack, queues)


def build_router(settings: Settings, config: Config, store: Store, dry_run: bool = False) -> Router:
    lookup = None
    key = config.routing.owner_metadata_key
    stripe_billing = connectors(settings, config).get("stripe")
    if key and stripe_billing is not None:
        stripe_factory = stripe_billing  # paced like every other Stripe call

        def lookup(customer_id: str) -> str | None:
            connector: Any = stripe_factory()
            return connector.customer_metadata(customer_id).get(key)

    return Router(
        store,
        config,
        build_outbox(settings, config),
        owners=load_owners(config, settings.config_path),
        owner_lookup=lookup,
        public_url=settings.public_url,
        dry_run=dry_run,
    )


def build_worker(settings: Settings, config: Config) -> tuple[Context, Worker]:
    context = build_context(settings, config)
    handlers = all_handlers(context) | schedule_handlers(context)
    job = Worker(context.store, handlers, renewer=context.store.sibling)
    return context, job


def sweep_now(context: Context) -> int:
    """List each configured platform's recent invoices and enqueue any that no stored event covers."""
    since = datetime.now(UTC) - SWEEP_WINDOW
    added = 0
    for name, factory in context.billing.items():
        added += sweep(context, PLATFORMS[name], factory(), since)
    return added


def sweep_due(context: Context, settings: Settings, every: float) -> Callable[[], None]:
    """A sweep that runs at most once every `every` seconds (called when the inbox is idle)."""
    return at_most_every(every, lambda: sweep_now(context))
