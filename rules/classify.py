"""The verdict on one key: its units, its money, its class, where it broke and why.

Units are compared before money. The meter should hold the period's on-time
events plus the catch-up of earlier late events (the contract's rule); two other
readings are accepted as agreement too: a platform that kept late events in their
own period, and a catch-up not billed yet (the timing item then stays open).
`break_at` says which comparison failed: raw vs metered (`metering`), metered vs
invoiced (`billing`), or `both`. When units agree, the usage lines must be priced
right for the units they carry; credit or adjustment lines then make it `credit`,
a proration line or a plan change inside the period makes it `proration`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from rules.config import Meter, PlanChange
from rules.match import ZERO, KeyFacts
from rules.models import Evidence, InvoiceLine, Period, ReconLine, TimingRef
from rules.pricing import Pricing, billable_units, minor_unit, price, round_money
from rules.report import numbers_json
from rules.timeline import Segment


@dataclass(slots=True)
class Units:
    """A key's quantities in billable units."""

    raw: Decimal
    late: Decimal
    catchup: Decimal
    metered: Decimal
    invoiced: Decimal
    on_time: Decimal  # what the meter and the invoice should hold (contract rule)
    with_late: Decimal  # the same if the platform kept late events in their own period
    without_catchup: Decimal  # the same if the catch-up is not billed yet


@dataclass(slots=True)
class Reading:
    """Which expectation the records agree with, if any."""

    agrees: bool
    timing: bool = False
    clears: bool = False
    break_at: str = "none"


@dataclass(slots=True)
class Terms:
    """The customer's plan for the period: terms at its start, and changes inside it."""

    included: Decimal
    pricing: Pricing
    changes: tuple[PlanChange, ...]


@dataclass(slots=True)
class Money:
    expected: Decimal  # the price of the incurred units over the included ones
    usage: Decimal  # what the usage and proration lines charge
    adjustments: Decimal  # what the credit and adjustment lines change
    priced: Decimal  # what the usage lines should charge for the units they carry
    drift: Decimal  # rounding allowed: one minor unit per line beyond the first


def judge(
    facts: KeyFacts,
    meter: Meter | None,
    period: Period,
    segments: dict[int, Segment],
    evidence_limit: int,
    memo: dict[tuple[Any, ...], Any] | None = None,
) -> ReconLine:
    """The verdict on one key. `memo` (a dict kept for one run) lets plain keys with the same
    quantities and amount share their numbers and the numbers' text."""
    if meter is None or not facts.customer_id:
        return _unmapped(facts, meter, period, evidence_limit, None)
    agreed = _plain_match(facts, meter, period, memo)
    if agreed is not None:
        return agreed
    foreign = [ln.currency for ln in facts.lines if ln.currency != meter.currency]
    if foreign:
        foreign = sorted(set(foreign))
        why = f"invoice lines in {', '.join(foreign)}, the meter is priced in {meter.currency}"
        return _unmapped(facts, meter, period, evidence_limit, why)
    terms = _terms(meter, period, facts.customer_id)
    units = _units(facts, meter)
    usage = [ln for ln in facts.lines if ln.kind in ("usage", "proration")]
    free = not usage and price(terms.pricing, units.on_time - terms.included) == 0
    reading = _read(units, meter.tolerance, missing_line_is_free=free)
    money = _money(facts, meter, period, terms, segments, units, usage)
    is_proration = bool(terms.changes) or any(ln.kind == "proration" for ln in facts.lines)
    if not reading.agrees:
        klass, break_at = _direction(units), reading.break_at
        cause = _unit_cause(units, facts, money.adjustments, meter.currency, usage)
    elif abs(money.priced - money.usage) > money.drift:
        klass, break_at = ("under_bill" if money.priced > money.usage else "over_bill"), "billing"
        cause = _mispriced(units.invoiced, money, is_proration, meter.currency)
    else:
        klass, cause = _agreed(
            units, reading, money.adjustments, is_proration, bool(terms.changes), meter.currency, usage
        )
        break_at = reading.break_at
    included = _included(meter, period, terms, facts.customer_id)
    return ReconLine(
        customer_id=facts.customer_id,
        meter=facts.meter,
        period=period,
        raw_units=units.raw,
        late_units=units.late,
        catchup_units=units.catchup,
        metered_units=units.metered,
        invoiced_units=units.invoiced,
        incurred_overage=max(units.raw - included, ZERO),
        invoiced_overage=max(units.invoiced - included, ZERO),
        expected_amount=money.expected,
        invoiced_amount=round_money(money.usage + money.adjustments, meter.currency),
        credit_amount=round_money(money.adjustments, meter.currency),
        delta_units=units.raw - units.invoiced,
        delta_amount=round_money(money.expected - money.usage - money.adjustments, meter.currency),
        currency=meter.currency,
        klass=klass,
        break_at=break_at,
        cause=_with_duplicates(cause, facts),
        evidence=_evidence(facts, evidence_limit, reading.clears),
    )


MEMO_LIMIT = 50_000  # plain keys' numbers kept at once (about 15 MB)
_NO_MONEY: dict[Decimal, Decimal] = {}  # a currency's minor unit → zero money at its precision


def _plain_match(
    facts: KeyFacts, meter: Meter, period: Period, memo: dict[tuple[Any, ...], Any] | None = None
) -> ReconLine | None:
    """The verdict on a plain key whose units and amount agree; None for any other key.

    A plain key has one usage line in the meter's currency, nothing late, no catch-up, no
    duplicates and a meter without plan changes: most keys of a book. The rules are the
    whole path's with its readings reduced to the one a plain key has (on time = raw, no
    adjustments, no proration, no drift), so a disagreement is left to the whole path.

    Its numbers depend only on the meter, the raw and metered quantities and the line's
    quantity and amount, and many keys share them: `memo` keeps them (and their JSON text) by
    those. The quantities are keyed by their text, which keeps their exponent (`108` and `108.0`
    are equal, and written differently); the line's quantity and amount by identity (a file's
    distinct values are parsed once into one object each), the memo holding them so that an
    identity is never reused while it lives."""
    if meter.plan or len(facts.lines) != 1:
        return None
    line = facts.lines[0]
    currency = meter.currency
    if line.kind != "usage" or line.currency != currency:
        return None
    if facts.late or facts.catchup or facts.dropped_copies or facts.late_ids or facts.catchup_ids:
        return None
    if facts.duplicate_ids:
        return None
    if memo is None:
        numbers = _plain_numbers(facts, meter, line)
        shown = None
    else:
        metered = facts.metered
        key = (id(meter), str(facts.raw), None if metered is None else str(metered), id(line.quantity), id(line.amount))
        known = memo.get(key)
        if known is None:
            if len(memo) >= MEMO_LIMIT:  # a book whose keys share little: start again, bounded
                memo.clear()
            numbers = _plain_numbers(facts, meter, line)
            shown = numbers_json(numbers) if numbers is not None else None
            known = memo[key] = (numbers, shown, line.quantity, line.amount)
        numbers, shown = known[0], known[1]
    if numbers is None:
        return None
    return ReconLine(
        facts.customer_id,
        facts.meter,
        period,
        *numbers,
        currency,
        "match",
        "none",
        "raw, metered and invoiced agree",
        Evidence((), (), (), (line.line_id,), (line.invoice_id,), ()),
        shown,
    )


def _plain_numbers(facts: KeyFacts, meter: Meter, line: InvoiceLine) -> tuple[Decimal, ...] | None:
    """A plain key's numbers (NUMBER_FIELDS' order) when its units and amount agree, else None."""
    raw = _convert(facts.raw, meter)
    if facts.metered is None:
        metered = ZERO
    else:
        metered = raw if facts.metered == facts.raw else _convert(facts.metered, meter)
    invoiced = ZERO + line.quantity
    tolerance = meter.tolerance
    if (metered != raw and abs(metered - raw) > tolerance) or (
        invoiced != metered and abs(invoiced - metered) > tolerance
    ):
        return None
    currency = meter.currency
    included, pricing = meter.included, meter.pricing
    cent = minor_unit(currency)
    expected = price(pricing, raw - included).quantize(cent, rounding=ROUND_HALF_UP)
    if invoiced == raw:
        priced = expected
    else:
        priced = price(pricing, invoiced - included).quantize(cent, rounding=ROUND_HALF_UP)
    usage = ZERO + line.amount
    if priced != usage:
        return None
    nothing = raw - raw  # late and catch-up units: none, at the units' precision
    no_money = _NO_MONEY.get(cent)
    if no_money is None:
        no_money = _NO_MONEY[cent] = ZERO.quantize(cent)
    return (
        raw,
        nothing,
        nothing,
        metered,
        invoiced,
        max(raw - included, ZERO),
        max(invoiced - included, ZERO),
        expected,
        usage.quantize(cent, rounding=ROUND_HALF_UP),  # adjustments are none
        no_money,
        raw - invoiced,
        no_money if expected == usage else (expected - usage).quantize(cent, rounding=ROUND_HALF_UP),
    )


def _convert(raw: Decimal, meter: Meter) -> Decimal:
    """Raw units in the meter's billable units."""
    return billable_units(raw, meter.unit_size, meter.rounding, meter.precision)


def _money(
    facts: KeyFacts,
    meter: Meter,
    period: Period,
    terms: Terms,
    segments: dict[int, Segment],
    units: Units,
    usage: list[InvoiceLine],
) -> Money:
    expected = _expected_amount(facts, meter, period, terms, segments, units)
    if terms.changes:
        priced = expected
    else:
        priced = round_money(price(terms.pricing, units.invoiced - terms.included), meter.currency)
    return Money(
        expected=expected,
        usage=sum((ln.amount for ln in usage), ZERO),
        adjustments=sum((ln.amount for ln in facts.lines if ln.kind in ("credit", "adjustment")), ZERO),
        priced=priced,
        drift=(len(usage) - 1) * minor_unit(meter.currency) if len(usage) > 1 else ZERO,
    )


def _units(facts: KeyFacts, meter: Meter) -> Units:
    # Billable units depend on the raw quantity's value only, so a conversion of the same
    # value is reused (most keys have no late events, no catch-up, and the meter agrees).
    raw = _convert(facts.raw, meter)
    own_on_time = _convert(facts.raw - facts.late, meter) if facts.late else raw
    on_time = _convert(facts.raw - facts.late + facts.catchup, meter) if facts.catchup else own_on_time
    if facts.metered is None:
        metered = ZERO
    else:
        metered = raw if facts.metered == facts.raw else _convert(facts.metered, meter)
    return Units(
        raw=raw,
        late=raw - own_on_time,
        catchup=on_time - own_on_time,
        metered=metered,
        invoiced=sum((ln.quantity for ln in facts.lines if ln.kind in ("usage", "proration")), ZERO),
        on_time=on_time,
        with_late=_convert(facts.raw + facts.catchup, meter) if facts.catchup else raw,
        without_catchup=own_on_time,
    )


def _near(a: Decimal, b: Decimal, tolerance: Decimal) -> bool:
    return abs(a - b) <= tolerance


def _read(units: Units, tolerance: Decimal, missing_line_is_free: bool) -> Reading:
    """The first expectation that both the meter and the invoice agree with.

    A key with no invoice line whose usage costs nothing agrees on billing: a
    platform need not print a zero line.
    """
    readings = [(units.on_time, units.late > 0, units.catchup > 0)]
    if units.late > 0:
        readings.append((units.with_late, False, units.catchup > 0))
    if units.catchup > 0:
        readings.append((units.without_catchup, units.late > 0, False))
    billing_ok = _near(units.invoiced, units.metered, tolerance) or missing_line_is_free
    for expected, timing, clears in readings:
        if _near(units.metered, expected, tolerance) and billing_ok:
            return Reading(agrees=True, timing=timing, clears=clears, break_at="metering" if timing else "none")
    metering_ok = any(_near(units.metered, expected, tolerance) for expected, _, _ in readings)
    if metering_ok:
        return Reading(agrees=False, break_at="billing")
    return Reading(agrees=False, break_at="metering" if billing_ok else "both")


def _direction(units: Units) -> str:
    """Under- or over-bill by the invoice's units against what should be on it."""
    if units.invoiced < units.on_time:
        return "under_bill"
    if units.invoiced > units.on_time:
        return "over_bill"
    return "under_bill" if units.metered < units.on_time else "over_bill"


def _applies(change: PlanChange, customer: str) -> bool:
    return change.customer is None or change.customer == customer


def _terms(meter: Meter, period: Period, customer: str) -> Terms:
    """The terms in force at the period's start, and the customer's changes inside it."""
    if not meter.plan:
        return Terms(meter.included, meter.pricing, ())
    included, pricing = _terms_at(meter, period.start, customer)
    changes = tuple(c for c in meter.plan if period.start < c.effective < period.end and _applies(c, customer))
    return Terms(included, pricing, changes)


def _terms_at(meter: Meter, moment: datetime, customer: str) -> tuple[Decimal, Pricing]:
    """Included units and pricing in force for the customer at `moment`."""
    included, pricing = meter.included, meter.pricing
    for change in meter.plan:
        if change.effective <= moment and _applies(change, customer):
            included, pricing = change.included, change.pricing
    return included, pricing


def _included(meter: Meter, period: Period, terms: Terms, customer: str) -> Decimal:
    """Included units for the period, prorated by time across plan changes."""
    if not terms.changes:
        return terms.included
    length = Decimal((period.end - period.start).total_seconds())
    edges = [period.start, *(c.effective for c in terms.changes), period.end]
    total = ZERO
    for start, end in zip(edges, edges[1:], strict=False):
        share = Decimal((end - start).total_seconds()) / length
        total += _terms_at(meter, start, customer)[0] * share
    return total


def _expected_amount(
    facts: KeyFacts, meter: Meter, period: Period, terms: Terms, segments: dict[int, Segment], units: Units
) -> Decimal:
    """The price of the incurred units over the included ones, prorated across plan changes."""
    if not terms.changes:
        return round_money(price(terms.pricing, units.raw - terms.included), meter.currency)
    length = Decimal((period.end - period.start).total_seconds())
    total = ZERO
    for index, segment in segments.items():
        if segment.period_index != facts.period_index:
            continue
        included, pricing = _terms_at(meter, segment.start, facts.customer_id)
        share = Decimal((segment.end - segment.start).total_seconds()) / length
        raw = (facts.segment_raw or {}).get(index, ZERO)
        units = billable_units(raw, meter.unit_size, meter.rounding, meter.precision)
        total += price(pricing, units - included * share)
    return round_money(total, meter.currency)


def _agreed(
    units: Units,
    reading: Reading,
    adjustments: Decimal,
    is_proration: bool,
    planned: bool,
    currency: str,
    usage: list[InvoiceLine],
) -> tuple[str, str]:
    if adjustments != 0:
        word = "credit" if adjustments < 0 else "adjustment"
        return "credit", f"units agree; a {word} of {_text(abs(adjustments), currency)} explains the difference"
    if is_proration:
        how = (
            "prorated across the plan change"
            if planned
            else "with a proration line (plan change not in config: amount not re-priced)"
        )
        return "proration", f"units agree; priced {how}"
    if reading.timing:
        return "timing", (f"{units.late} late units received after the cutoff; expected next cycle")
    if not usage:
        return "match", "no invoice line; usage within included units"
    if reading.clears:
        return "match", f"agrees, including {units.catchup} catch-up units from an earlier period"
    return "match", "raw, metered and invoiced agree"


def _mispriced(invoiced: Decimal, money: Money, is_proration: bool, currency: str) -> str:
    what = "prorated amount" if is_proration else "amount"
    cause = (
        f"units agree but {invoiced} units are charged {_text(money.usage, currency)}; "
        f"the {what} should be {_text(money.priced, currency)}"
    )
    if money.adjustments:
        cause += f"; a credit of {_text(abs(money.adjustments), currency)} explains part"
    return cause


def _unit_cause(units: Units, facts: KeyFacts, adjustments: Decimal, currency: str, usage: list[InvoiceLine]) -> str:
    parts = []
    if not usage:
        parts.append(f"no invoice line for {units.on_time} units")
    elif not facts.raw and not facts.catchup:
        parts.append(f"invoiced {units.invoiced} units with no usage")
    elif units.invoiced != units.metered:
        parts.append(f"invoice has {units.invoiced} units, the meter {units.metered}")
    if units.metered != units.on_time:
        if facts.metered is None:
            parts.append(f"the meter has no record of {units.on_time} units")
        else:
            parts.append(f"the meter has {units.metered} units, raw usage {units.on_time}")
    if units.late:
        parts.append(f"{units.late} late units expected next cycle")
    if adjustments:
        parts.append(f"a credit of {_text(abs(adjustments), currency)} explains part")
    return "; ".join(parts) or "units disagree"


def _with_duplicates(cause: str, facts: KeyFacts) -> str:
    if not facts.dropped_copies:
        return cause
    note = f"{facts.dropped_copies} duplicate event{'' if facts.dropped_copies == 1 else 's'} ignored"
    if facts.conflicting_copies:
        note += f" ({facts.conflicting_copies} with differing quantities; the first received was kept)"
    return f"{cause}; {note}"


def _text(amount: Decimal, currency: str) -> str:
    return f"{round_money(amount, currency)} {currency.upper()}"


def _evidence(facts: KeyFacts, limit: int, clears: bool) -> Evidence:
    def first(ids: list[str]) -> tuple[str, ...]:
        return tuple(sorted(set(ids))[:limit]) if ids else ()

    lines = facts.lines
    if len(lines) == 1:
        line_ids, invoice_ids = (lines[0].line_id,), (lines[0].invoice_id,)
    else:
        line_ids = tuple(sorted(ln.line_id for ln in lines))
        invoice_ids = tuple(sorted({ln.invoice_id for ln in lines}))
    return Evidence(
        duplicate_event_ids=first(facts.duplicate_ids),
        late_event_ids=first(facts.late_ids),
        catchup_event_ids=first(facts.catchup_ids),
        invoice_line_ids=line_ids,
        invoice_ids=invoice_ids,
        clears=tuple(TimingRef(facts.customer_id, facts.meter, p) for p in sorted(facts.clears)) if clears else (),
    )


def _unmapped(facts: KeyFacts, meter: Meter | None, period: Period, limit: int, why: str | None) -> ReconLine:
    currencies = sorted({ln.currency for ln in facts.lines})
    currency = meter.currency if meter else (currencies[0] if currencies else "")
    invoiced = sum((ln.quantity for ln in facts.lines if ln.kind in ("usage", "proration")), ZERO)
    amount = sum((ln.amount for ln in facts.lines), ZERO)
    if why:
        cause = why
    elif meter is None:
        cause = f"meter {facts.meter!r} is not in the config" if facts.meter else "record has no meter"
    else:
        cause = "record has no customer id"
    money = amount.quantize(minor_unit(currency)) if currency else amount
    nothing = ZERO.quantize(minor_unit(currency)) if currency else ZERO  # "0.00", as on other lines
    return ReconLine(
        customer_id=facts.customer_id,
        meter=facts.meter,
        period=period,
        raw_units=facts.raw,
        late_units=facts.late,
        catchup_units=facts.catchup,
        metered_units=facts.metered or ZERO,
        invoiced_units=invoiced,
        incurred_overage=ZERO,
        invoiced_overage=ZERO,
        expected_amount=nothing,
        invoiced_amount=money,
        credit_amount=nothing,
        delta_units=facts.raw - invoiced,
        delta_amount=-money,
        currency=currency,
        klass="unmapped",
        break_at="none",
        cause=cause,
        evidence=_evidence(facts, limit, clears=False),
    )
