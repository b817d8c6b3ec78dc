"""The three-way join: raw aggregates, metered rows and invoice lines, by key.

A key is customer × meter × period. A metered row or an invoice line belongs to
the period that contains its `[period_start, period_end)`; one that no period of
the run contains is out of scope and counted as such, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from rules.models import InvoiceLine, MeteredRecord, RawAggregate
from rules.timeline import Timeline

ZERO = Decimal(0)
Key = tuple[str, str, int]


@dataclass(slots=True)
class KeyFacts:
    """Everything the three records say about one key, in raw units.

    A run holds one per key, so the collections are immutable empties until a key has
    something to put in them (most have one invoice line and nothing else), and
    `segment_raw` is kept only when plan changes split a period into segments.
    """

    customer_id: str
    meter: str
    period_index: int
    raw: Decimal = ZERO
    late: Decimal = ZERO
    catchup: Decimal = ZERO
    segment_raw: dict[int, Decimal] | None = None
    metered: Decimal | None = None
    lines: tuple[InvoiceLine, ...] = ()
    late_ids: tuple[str, ...] = ()
    catchup_ids: tuple[str, ...] = ()
    duplicate_ids: tuple[str, ...] = ()
    dropped_copies: int = 0
    conflicting_copies: int = 0
    clears: frozenset[str] = frozenset()


@dataclass
class Joined:
    facts: dict[Key, KeyFacts]
    out_of_scope_metered: int = 0
    out_of_scope_lines: int = 0


def join(
    timeline: Timeline,
    raw: Iterable[RawAggregate],
    metered: Iterable[MeteredRecord],
    lines: Iterable[InvoiceLine],
    customers: frozenset[str] = frozenset(),
) -> Joined:
    """Group the three records by key; `customers`, when given, keeps only those."""
    return add_raw(join_billing(timeline, metered, lines, customers), timeline, raw, customers)


def join_billing(
    timeline: Timeline,
    metered: Iterable[MeteredRecord],
    lines: Iterable[InvoiceLine],
    customers: frozenset[str] = frozenset(),
) -> Joined:
    """The billing side grouped by key (a run does this while the raw events are still being
    scanned); `add_raw` then adds the raw aggregates."""
    joined = Joined(facts={})
    every = not customers
    found = joined.facts
    # A book's records name few distinct periods: each one's index is looked up once.
    period_of: dict[tuple[datetime, datetime], int | None] = {}
    for record in metered:
        bounds = (record.period_start, record.period_end)
        index = period_of.get(bounds, -1)
        if index == -1:
            index = period_of[bounds] = timeline.period_of(*bounds)
        if index is None:
            joined.out_of_scope_metered += 1
        elif every or record.customer_id in customers:
            key = (record.customer_id, record.meter, index)
            facts = found.get(key)
            if facts is None:
                facts = found[key] = KeyFacts(*key)
            facts.metered = (facts.metered or ZERO) + record.quantity
    for line in lines:
        bounds = (line.period_start, line.period_end)
        index = period_of.get(bounds, -1)
        if index == -1:
            index = period_of[bounds] = timeline.period_of(*bounds)
        if index is None:
            joined.out_of_scope_lines += 1
        elif every or line.customer_id in customers:
            key = (line.customer_id, line.meter, index)
            facts = found.get(key)
            if facts is None:
                facts = found[key] = KeyFacts(*key)
            facts.lines = (*facts.lines, line)
    return joined


def add_raw(
    joined: Joined, timeline: Timeline, raw: Iterable[RawAggregate], customers: frozenset[str] = frozenset()
) -> Joined:
    """`joined` with the raw aggregates added to their keys."""
    every = not customers
    for aggregate in raw:
        if every or aggregate.customer_id in customers:
            _add_raw(joined.facts, timeline, aggregate)
    return joined


def _facts(facts: dict[Key, KeyFacts], customer: str, meter: str, index: int) -> KeyFacts:
    key = (customer, meter, index)
    found = facts.get(key)
    if found is None:
        found = facts[key] = KeyFacts(customer, meter, index)
    return found


def _add_raw(facts: dict[Key, KeyFacts], timeline: Timeline, aggregate: RawAggregate) -> None:
    periods = len(timeline.periods)
    own: KeyFacts | None = None
    if aggregate.segment is not None:
        own = _facts(facts, aggregate.customer_id, aggregate.meter, timeline.segments[aggregate.segment].period_index)
        own.raw += aggregate.quantity
        if len(timeline.segments) > periods:  # plan changes split some period
            if own.segment_raw is None:
                own.segment_raw = {}
            own.segment_raw[aggregate.segment] = own.segment_raw.get(aggregate.segment, ZERO) + aggregate.quantity
        if aggregate.duplicate_event_ids:
            own.duplicate_ids += aggregate.duplicate_event_ids
        own.dropped_copies += aggregate.dropped_copies
        own.conflicting_copies += aggregate.conflicting_copies
        if aggregate.receiving is not None:
            own.late += aggregate.quantity
            own.late_ids += aggregate.late_event_ids
    receiving = aggregate.receiving
    if receiving is None or not 0 <= receiving < periods:
        return
    target = _facts(facts, aggregate.customer_id, aggregate.meter, receiving)
    target.catchup += aggregate.quantity
    target.catchup_ids += aggregate.late_event_ids
    if own is not None:
        target.clears |= {timeline.periods[own.period_index].label}
    else:
        target.clears |= frozenset(aggregate.origin_periods)
        target.duplicate_ids += aggregate.duplicate_event_ids
        target.dropped_copies += aggregate.dropped_copies
        target.conflicting_copies += aggregate.conflicting_copies
