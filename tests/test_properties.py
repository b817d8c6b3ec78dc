"""Properties over generated books: row order never matters, and the money adds up."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules.classify import judge
from rules.config import Meter, PlanChange
from rules.match import KeyFacts
from rules.models import Evidence, InvoiceLine, Period, ReconLine, TimingRef
from rules.pricing import Pricing, Tier, billable_units, price, round_money
from rules.report import NUMBER_FIELDS, LineWriter, line_json, line_text, number, numbers_json
from rules.timeline import Segment
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


# A plain key (one usage line, nothing late, no duplicates, no plan) that agrees is settled in
# one step; a plan change before the period to the same terms sends the same key down the
# whole path, which must give the same verdict.
OCTOBER = Period(datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC), "2026-10")
quantities = st.decimals(min_value=0, max_value=100_000, places=2, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    raw=quantities,
    metered_as=st.sampled_from(["raw", "none", "other"]),
    other=quantities,
    invoiced_as=st.sampled_from(["billable", "other"]),
    amount_as=st.sampled_from(["priced", "other"]),
    cents=st.integers(0, 500_000),
    unit_size=st.sampled_from([Decimal(1), Decimal(10), Decimal("0.5")]),
    rounding=st.sampled_from(["up", "down", "half_up"]),
    precision=st.integers(0, 2),
    included=st.sampled_from([Decimal(0), Decimal(50), Decimal("1000.5")]),
    pricing=st.sampled_from(
        [
            Pricing(unit_price=Decimal("0.02")),
            Pricing(model="package", package_size=Decimal(100), package_price=Decimal("1.5")),
            Pricing(model="graduated", tiers=(Tier(Decimal(100), Decimal("0.1")), Tier(None, Decimal("0.013")))),
        ]
    ),
    tolerance=st.sampled_from([Decimal(0), Decimal(1)]),
    currency=st.sampled_from(["usd", "jpy"]),
)
def test_a_plain_key_gets_the_whole_paths_verdict(
    raw,
    metered_as,
    other,
    invoiced_as,
    amount_as,
    cents,
    unit_size,
    rounding,
    precision,
    included,
    pricing,
    tolerance,
    currency,
):
    meter = Meter("api_calls", unit_size, rounding, precision, included, pricing, currency, tolerance)
    billable = billable_units(raw, unit_size, rounding, precision)
    quantity = billable if invoiced_as == "billable" else other
    if amount_as == "priced":
        amount = round_money(price(pricing, quantity - included), currency)
    else:
        amount = Decimal(cents) / 100
    usage = InvoiceLine(
        "in_1", "il_1", "cus_a", "api_calls", OCTOBER.start, OCTOBER.end, quantity, amount, currency, "usage"
    )
    facts = KeyFacts("cus_a", "api_calls", 0, raw=raw, lines=(usage,))
    facts.metered = {"raw": raw, "none": None, "other": other}[metered_as]
    planned = replace(meter, plan=(PlanChange(datetime(2026, 9, 1, tzinfo=UTC), included, pricing),))
    segments = {0: Segment(OCTOBER.start, OCTOBER.end, 0)}
    # Compared as the report writes them: the same digits, not only equal values.
    assert line_json(judge(facts, meter, OCTOBER, segments, 5)) == line_json(
        judge(facts, planned, OCTOBER, segments, 5)
    )
    # With the run's memo, after keys of equal values written otherwise: still the same text.
    memo: dict = {}
    twin_raw = KeyFacts("cus_b", "api_calls", 0, raw=written_otherwise(raw), lines=(usage,))
    twin_raw.metered = facts.metered
    twin_metered = KeyFacts("cus_c", "api_calls", 0, raw=raw, lines=(usage,))
    twin_metered.metered = None if facts.metered is None else written_otherwise(facts.metered)
    twin_line = KeyFacts(
        "cus_d", "api_calls", 0, raw=raw, lines=(replace(usage, quantity=written_otherwise(quantity)),)
    )
    twin_line.metered = facts.metered
    write = LineWriter()
    for twin in (twin_raw, twin_metered, twin_line):
        assert write(judge(twin, meter, OCTOBER, segments, 5, memo)) == line_text(
            line_json(judge(twin, meter, OCTOBER, segments, 5))
        )
    for _ in range(2):  # the first fills the memo (or finds the twin's entry), the second finds it
        assert write(judge(facts, meter, OCTOBER, segments, 5, memo)) == line_text(
            line_json(judge(facts, meter, OCTOBER, segments, 5))
        )


def written_otherwise(value: Decimal) -> Decimal:
    """The same value with one more trailing zero (`5` → `5.0`): equal, and written differently."""
    return value.quantize(Decimal(10) ** (value.as_tuple().exponent - 1))  # type: ignore[operator]


texts = st.text(max_size=12)  # quotes, backslashes, control characters, non-ASCII, lone surrogates
numbers = st.decimals(allow_nan=False, allow_infinity=False)
id_lists = st.lists(texts, max_size=3).map(tuple)


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(texts, texts, texts, texts, texts, texts),
    st.tuples(*[numbers] * len(NUMBER_FIELDS)),
    st.tuples(id_lists, id_lists, id_lists, id_lists, id_lists),
    st.lists(st.tuples(texts, texts, texts), max_size=2),
)
def test_a_line_written_straight_from_its_verdict_is_the_dicts_text(words, values, ids, clears):
    customer, meter, currency, klass, break_at, cause = words
    verdict = ReconLine(
        customer,
        meter,
        OCTOBER,
        *values,
        currency,
        klass,
        break_at,
        cause,
        Evidence(*ids, clears=tuple(TimingRef(*c) for c in clears)),
    )
    assert LineWriter()(verdict) == line_text(line_json(verdict))


few = st.sampled_from(["cus_a", "cus_b", 'q"\\', "\u00e9"])  # a few texts, so that lines share them


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            few,
            st.sampled_from(["api_calls", "storage"]),
            st.sampled_from([Decimal("108"), Decimal("108.0"), Decimal("-1")]),
            st.sampled_from(["match", "under_bill"]),
            st.sampled_from(["none", "billing"]),
            st.sampled_from([(), ("in_1",), ("in_2",), ("in_1", "in_2")]),
            st.booleans(),
        ),
        max_size=12,
    )
)
def test_one_writer_over_a_run_writes_each_line_as_its_dict(rows):
    # One LineWriter over many lines, as a run uses it: lines that share their numbers' text
    # (the plain keys' memo), a meter, a class, a customer or invoice ids with the line before
    # are still written as their own dict.
    write = LineWriter()
    for customer, meter, value, klass, break_at, invoices, shared in rows:
        values = (value,) * len(NUMBER_FIELDS)
        verdict = ReconLine(
            customer,
            meter,
            OCTOBER,
            *values,
            "usd",
            klass,
            break_at,
            "the same cause",
            Evidence(invoice_line_ids=("il_1",), invoice_ids=invoices),
            numbers_json(values) if shared else None,
        )
        assert write(verdict) == line_text(line_json(verdict))


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_report_numbers_are_positional_text_of_the_same_value(value):
    text = number(value)
    assert "E" not in text
    assert Decimal(text) == value
    assert text == format(value, "f").removeprefix("-" if not value else "")  # never "-0"
