"""The period close: once a period is over (and its late events are in), one run over every
customer of the period, those with usage and no invoice too, with nobody running a command.

The close is an inbox item like a webhook event (provider `schedule`, id `close_<period>`),
so it is claimed under a lease by exactly one worker, redone if that worker dies, and
enqueued any number of times with no second run. `recon close` enqueues one by hand (or
from cron); an idle worker enqueues the latest closed period by itself when `[schedule]`
is in the config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime

from bot.config import NotConfigured
from bot.handlers import Context
from bot.service import RunResult, SourcePaths, reconcile_files, reconcile_platform
from bot.signatures import InboundEvent
from bot.store import Claimed, Store
from bot.worker import Handler, Outcome, at_most_every, utc_now
from connectors.raw import resolve
from rules.models import Period
from rules.periods import last_closed, parse_periods

log = logging.getLogger(__name__)
PROVIDER, CLOSE = "schedule", "period.close"


def enqueue_close(store: Store, period: Period) -> bool:
    """Ask for `period`'s close; False when it was asked for already."""
    body = json.dumps({"period": period.label})
    return store.save_event(InboundEvent(PROVIDER, f"close_{period.label}", CLOSE, None, body))


def close_due(context: Context, every: float = 60, clock: Callable[[], datetime] = utc_now) -> Callable[[], None]:
    """For the worker's idle loop: at most every `every` seconds, ask for the latest closed
    period's close (a no-op once asked for). Nothing without `[schedule]`."""

    def ask() -> None:
        schedule = context.config.schedule
        if schedule is None:
            return
        period = last_closed(clock(), context.config.period.zone, schedule.close_after)
        if enqueue_close(context.store, period):
            log.info("period %s closed; its reconciliation is queued", period.label)

    return at_most_every(every, ask)


def schedule_handlers(context: Context) -> dict[tuple[str, str], Handler]:
    def close(claimed: Claimed) -> Outcome:
        label = json.loads(claimed.body)["period"]
        periods = parse_periods(label, context.config.period.zone)
        result = reconcile_period(context, periods)
        run_id = result.head["run_id"]
        if context.router is not None:
            context.router.route_run(run_id)
        summary = result.head["summary"]
        log.info("period %s closed: run %s, %d keys, %d matched", label, run_id, summary["keys"], summary["matched"])
        return Outcome("done", run_id)

    return {(PROVIDER, CLOSE): close}


def reconcile_period(context: Context, periods: tuple[Period, ...]) -> RunResult:
    """Every customer over `periods`, from the sources the config names (files, or a platform's API)."""
    config, base = context.config, context.config_path.parent
    platform = config.sources.platform
    if not config.sources.raw:
        raise NotConfigured("sources.raw: no raw events source in the config")
    raw = resolve(config.sources.raw, base)  # a path relative to the config, a pattern or a URL
    if platform is not None:
        return reconcile_platform(config, raw, context.connector(platform), periods, context.store)
    if not config.sources.metered or not config.sources.invoiced:
        raise NotConfigured("sources.metered, sources.invoiced: both are needed for the period close")
    paths = SourcePaths(raw, base / config.sources.metered, base / config.sources.invoiced)
    return reconcile_files(config, paths, periods, context.store)
