"""One reconciliation: the three records in, one verdict per key out, sorted."""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rules.classify import judge
from rules.config import Config
from rules.match import Joined, KeyFacts, join
from rules.models import InvoiceLine, MeteredRecord, Period, RawAggregate, Report
from rules.timeline import Timeline

# Part of every run's id: a change to what the same inputs report makes new runs. "2" from
# 2026-12-08: "1 duplicate event ignored" (was "events"), a month given as its dates is
# labelled as the month, and an unmapped line's expected and credit amounts are "0.00", not "0".
CALCULATION_VERSION = "2"


@contextmanager
def without_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: a run makes millions of objects and no cycles, and
    each full collection would walk them all again. Reference counting still frees memory."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@without_cyclic_gc()
def reconcile(
    config: Config,
    timeline: Timeline,
    raw: Iterable[RawAggregate],
    metered: Iterable[MeteredRecord],
    lines: Iterable[InvoiceLine],
    run_id: str,
    customers: frozenset[str] = frozenset(),
    every_meter: bool = False,
) -> tuple[Report, Joined]:
    """`every_meter` gives each of `customers` a key for every configured meter and period,
    so that usage with no invoice line and no meter record is still judged."""
    joined = join(timeline, raw, metered, lines, customers)
    return judge_all(config, timeline, joined, run_id, customers, every_meter)


@without_cyclic_gc()
def judge_all(
    config: Config,
    timeline: Timeline,
    joined: Joined,
    run_id: str,
    customers: frozenset[str] = frozenset(),
    every_meter: bool = False,
) -> tuple[Report, Joined]:
    """The verdict on every key of `joined`, sorted (`reconcile` after the join).

    The per-key facts are let go as they are judged: the returned `Joined` keeps its counts,
    and its `facts` are empty."""
    if every_meter:
        for customer in sorted(customers):
            for meter in config.meters:
                for index in range(len(timeline.periods)):
                    joined.facts.setdefault((customer, meter, index), KeyFacts(customer, meter, index))
    segments = dict(enumerate(timeline.segments))
    verdicts = []
    meters, periods, limit = config.meters, timeline.periods, config.evidence_limit
    memo: dict[tuple[object, ...], object] = {}  # plain keys' shared numbers (classify._plain_match)
    # Judged in the report's order: a key (customer, meter, period index) sorts as its line
    # (customer, meter, period start) does, and sorting the keys makes no tuple of its own.
    facts_of = joined.facts
    for key in sorted(facts_of):
        facts = facts_of.pop(key)
        verdicts.append(judge(facts, meters.get(facts.meter), periods[facts.period_index], segments, limit, memo))
    return Report(run_id=run_id, periods=timeline.periods, lines=tuple(verdicts)), joined


def run_id_for(
    config_fingerprint: str,
    input_fingerprints: dict[str, str],
    periods: tuple[Period, ...],
    customers: frozenset[str],
) -> str:
    """The same config, inputs, periods and customers always make the same run id."""
    basis = {
        "calculation": CALCULATION_VERSION,
        "config": config_fingerprint,
        "inputs": input_fingerprints,
        "periods": [[p.start.isoformat(), p.end.isoformat()] for p in periods],
        "customers": sorted(customers),
    }
    digest = hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()
    return f"run_{digest[:20]}"
