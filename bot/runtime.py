"""Wiring the worker from settings: the store, the platform connectors and the handlers."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from bot.config import Settings
from bot.handlers import PLATFORMS, SWEEP_WINDOW, Context, all_handlers, sweep
from bot.store import Store
from bot.worker import Worker
from connectors.base import InvoiceBilling
from connectors.orb import OrbBilling
from connectors.stripe import StripeBilling, make_client
from rules.config import Config


def connectors(settings: Settings, config: Config) -> dict[str, Callable[[], InvoiceBilling]]:
    """A connector factory for each platform whose API key is set."""
    billing: dict[str, Callable[[], InvoiceBilling]] = {}
    if settings.stripe_api_key:
        key, base = settings.stripe_api_key, settings.stripe_api_base
        billing["stripe"] = lambda: StripeBilling(make_client(key, base), config)
    if settings.orb_api_key:
        orb_key, orb_base = settings.orb_api_key, settings.orb_api_base
        billing["orb"] = lambda: OrbBilling(config, orb_key, orb_base)
    return billing


def build_context(settings: Settings, config: Config) -> Context:
    return Context(config, settings.config_path, Store.open(settings.database_url), connectors(settings, config))


def build_worker(settings: Settings, config: Config) -> tuple[Context, Worker]:
    context = build_context(settings, config)
    job = Worker(context.store, all_handlers(context), renewer=lambda: Store.open(settings.database_url))
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
    last = [float("-inf")]

    def maybe() -> None:
        if time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            sweep_now(context)

    return maybe
