"""Wiring the worker from settings: the store, the platform connectors and the handlers."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from bot.config import Settings
from bot.handlers import SWEEP_WINDOW, Context, stripe_handlers, sweep_stripe
from bot.store import Store
from bot.worker import Worker
from connectors.stripe import StripeBilling, make_client
from rules.config import Config


def build_context(settings: Settings, config: Config) -> Context:
    billing = {}
    if settings.stripe_api_key:
        key, base = settings.stripe_api_key, settings.stripe_api_base
        billing["stripe"] = lambda: StripeBilling(make_client(key, base), config)
    return Context(config, settings.config_path, Store.open(settings.database_url), billing)


def build_worker(settings: Settings, config: Config) -> tuple[Context, Worker]:
    context = build_context(settings, config)
    job = Worker(context.store, stripe_handlers(context), renewer=context.store.sibling)
    return context, job


def sweep_now(context: Context) -> int:
    """List the platform's recent invoices and enqueue any that no stored event covers."""
    if "stripe" not in context.billing:
        return 0
    since = datetime.now(UTC) - SWEEP_WINDOW
    return sweep_stripe(context, context.billing["stripe"](), since)


def sweep_due(context: Context, settings: Settings, every: float) -> Callable[[], None]:
    """A sweep that runs at most once every `every` seconds (called when the inbox is idle)."""
    last = [float("-inf")]

    def maybe() -> None:
        if time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            sweep_now(context)

    return maybe
