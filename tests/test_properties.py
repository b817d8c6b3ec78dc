"""Properties over generated books: row order never matters, and the money adds up."""

from __future__ import annotations

import random
from decimal import ROUND_CEILING, Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.book import event, line, metered, reconcile_book, write_book

CUSTOMERS = ["cus_a", "cus_b", "cus_c"]
EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

events = st.lists(
    st.tuples(
        st.integers(0, 15),  # event id: collisions make duplicates
        st.sampled_from(CUSTOMERS),
        st.integers(0, 40_000),  # quantity
        st.integers(1, 30),  # day of October
        st.sampled_from([None, "2026-10-31T00:00:00Z", "2026-11-04T00:00:00Z"]),  # on time, on time, late
    ),
    max_size=25,
)
invoice = st.lists(
    st.tuples(
        st.sampled_from(CUSTOMERS),
        st.sampled_from(["api_calls", "sms"]),
        st.sampled_from(["usage", "credit"]),
        st.integers(0, 200),
        st.integers(-5000, 30000),  # amount in cents
    ),
    max_size=6,
    unique_by=lambda t: (t[0], t[1], t[2]),
)
metering = st.dictionaries(st.sampled_from(CUSTOMERS), st.integers(0, 300_000), max_size=3)


def build(generated_events, generated_lines, generated_metering):
    raw = [
        event(f"e{i}", q, timestamp=f"2026-10-{day:02d}T12:00:00Z", received_at=rcv, customer=c)
        for i, c, q, day, rcv in generated_events
    ]
    lines = [
        line(q if kind == "usage" else 0, str(Decimal(cents) / 100), kind=kind, customer=c, meter=m)
        for c, m, kind, q, cents in generated_lines
    ]
    meters = [metered(q, customer=c) for c, q in generated_metering.items()]
    return raw, meters, lines


@EXAMPLES
@given(events, invoice, metering, st.randoms(use_true_random=False))
def test_shuffling_rows_never_changes_the_report(
    tmp_path_factory, generated_events, generated_lines, generated_metering, rnd: random.Random
):
    raw, meters, lines = build(generated_events, generated_lines, generated_metering)
    first_dir, second_dir = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    write_book(first_dir, raw, meters, lines)
    for rows in (raw, meters, lines):
        rnd.shuffle(rows)
    write_book(second_dir, raw, meters, lines)
    first, second = reconcile_book(first_dir, "2026-10"), reconcile_book(second_dir, "2026-10")
    assert first["lines"] == second["lines"]
    assert first["summary"] == second["summary"]


def incurred_amount(generated_events) -> Decimal:
    """An independent reading: first-received copy of each id, 1000 calls a unit rounded up, 50 free, 2.00 each."""
    kept: dict[str, tuple] = {}
    for i, c, q, day, rcv in generated_events:
        received = rcv or f"2026-10-{day:02d}T12:00:00Z"
        candidate = (received, q, c)
        if f"e{i}" not in kept or candidate < kept[f"e{i}"]:
            kept[f"e{i}"] = candidate
    per_customer: dict[str, int] = {}
    for _, q, c in kept.values():
        per_customer[c] = per_customer.get(c, 0) + q
    total = Decimal(0)
    for raw in per_customer.values():
        units = (Decimal(raw) / 1000).quantize(Decimal(1), rounding=ROUND_CEILING)
        total += max(units - 50, Decimal(0)) * 2
    return total


@EXAMPLES
@given(events, invoice, metering)
def test_delta_amounts_over_classes_add_up_to_incurred_minus_invoiced(
    tmp_path_factory, generated_events, generated_lines, generated_metering
):
    folder = tmp_path_factory.mktemp("book")
    raw, meters, lines = build(generated_events, generated_lines, generated_metering)
    write_book(folder, raw, meters, lines)
    report = reconcile_book(folder, "2026-10")
    by_class = sum(Decimal(c["amount"]) for c in report["summary"]["classes"].values())
    invoiced = sum(Decimal(cents) / 100 for *_, cents in generated_lines)
    assert by_class == incurred_amount(generated_events) - invoiced
