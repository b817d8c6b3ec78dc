"""The report in the contract's JSON shape, its summary, and its CSV columns.

Numbers are written as plain decimal strings (never exponents, never floats), so
the same inputs always give the same bytes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from itertools import islice
from operator import attrgetter
from typing import Any

import orjson

from rules.models import CLASSES, Period, ReconLine, Report
from rules.pricing import round_money

NUMBER_FIELDS = (  # a report line's numbers, named as the ReconLine fields that hold them
    "raw_units",
    "late_units",
    "catchup_units",
    "metered_units",
    "invoiced_units",
    "incurred_overage",
    "invoiced_overage",
    "expected_amount",
    "invoiced_amount",
    "credit_amount",
    "delta_units",
    "delta_amount",
)
EVIDENCE_FIELDS = (  # a report line's evidence lists, in its order
    "duplicate_event_ids",
    "late_event_ids",
    "catchup_event_ids",
    "invoice_line_ids",
    "invoice_ids",
    "clears",
)
CSV_COLUMNS = (
    "customer_id",
    "meter",
    "period",
    "period_start",
    "period_end",
    *NUMBER_FIELDS,
    "currency",
    "class",
    "break_at",
    "cause",
    *EVIDENCE_FIELDS,
)


def number(value: Decimal) -> str:
    """A decimal as plain positional text: `1E+3` is written `1000`, `-0` is `0`.

    `str()` is positional already unless it shows an exponent, and three times as quick
    as `format(value, "f")`, which a report calls thirteen times per line."""
    text = str(value)
    if "E" in text:
        text = format(value, "f")
    return text[1:] if text[0] == "-" and not value else text


def line_text(line: dict[str, Any]) -> str:
    """One report line as compact JSON (`json.dumps(line, separators=(",", ":"),
    ensure_ascii=False)`), made by orjson: the text the store keeps and the report prints."""
    try:
        return orjson.dumps(line).decode()
    except orjson.JSONEncodeError:  # e.g. a lone surrogate from a webhook's JSON, which only `json` writes
        return json.dumps(line, separators=(",", ":"))


def parse_line(text: str) -> dict[str, Any]:
    """A line's text read back into the dict it was made from (`line_text`'s inverse), by orjson,
    or by `json` for a text only it reads (a lone surrogate, escaped)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def period_json(period: Period) -> dict[str, str]:
    return {"start": period.start.isoformat(), "end": period.end.isoformat(), "label": period.label}


_numbers = attrgetter(*NUMBER_FIELDS)  # a ReconLine's numbers, named as in the report


def line_json(line: ReconLine, _periods: dict[int, tuple[str, str, str]] | None = None) -> dict[str, Any]:
    """One report line; `_periods` caches each period's (by identity) label and instants."""
    period = line.period
    shown = _periods.get(id(period)) if _periods is not None else None
    if shown is None:
        shown = (period.label, period.start.isoformat(), period.end.isoformat())
        if _periods is not None:
            _periods[id(period)] = shown
    texts = number_texts(_numbers(line))
    evidence = line.evidence
    shown_line = {
        "customer_id": line.customer_id,
        "meter": line.meter,
        "period": shown[0],
        "period_start": shown[1],
        "period_end": shown[2],
    }
    shown_line.update(zip(NUMBER_FIELDS, texts, strict=True))
    rest = {
        "currency": line.currency,
        "class": line.klass,
        "break_at": line.break_at,
        "cause": line.cause,
        "evidence": {
            "duplicate_event_ids": list(evidence.duplicate_event_ids),
            "late_event_ids": list(evidence.late_event_ids),
            "catchup_event_ids": list(evidence.catchup_event_ids),
            "invoice_line_ids": list(evidence.invoice_line_ids),
            "invoice_ids": list(evidence.invoice_ids),
            "clears": [
                {"customer_id": ref.customer_id, "meter": ref.meter, "period": ref.period} for ref in evidence.clears
            ],
        },
    }
    shown_line.update(rest)
    return shown_line


_NUMBERS_TEMPLATE = ",".join(f'"{name}":"%s"' for name in NUMBER_FIELDS)
_LINE_TEMPLATE = (  # line_json's keys in its order; each %s is a value's JSON text, the second `_MIDDLE_TEMPLATE`'s
    '{"customer_id":%s,%s,"evidence":{' + ",".join(f'"{name}":%s' for name in EVIDENCE_FIELDS) + "}}"
)
_MIDDLE_TEMPLATE = '"meter":%s,"period":%s,%s,"currency":%s,"class":%s,"break_at":%s,"cause":%s'


def numbers_json(values: tuple[Decimal, ...]) -> str:
    """The numbers' part of a line's JSON text (`"raw_units":"108",...,"delta_amount":"0.00"`),
    for `values` in NUMBER_FIELDS order."""
    return _NUMBERS_TEMPLATE % number_texts(values)


def number_texts(values: tuple[Decimal, ...]) -> tuple[str, ...]:
    """`number()` of each value, made by `str()` unless an exponent or a minus sign shows."""
    texts = tuple(map(str, values))
    joined = "".join(texts)
    if "E" in joined or "-" in joined:
        texts = tuple(map(number, values))
    return texts


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _ids(ids: tuple[str, ...]) -> str:
    return _json(ids) if ids else "[]"


MIDDLES_LIMIT = 50_000  # shared middles kept at once by a LineWriter (as classify.MEMO_LIMIT)


class LineWriter:
    """Report lines as their compact JSON text straight from the verdicts, without the dict:
    byte for byte `line_text(line_json(line))`. Texts that repeat from line to line (meters,
    classes, causes, periods) are quoted once, and a verdict that carries its numbers' text
    (`ReconLine.numbers_json`, shared by the plain keys with the same numbers) is not
    formatted again: a run of 500,000 keys writes every line."""

    def __init__(self) -> None:
        self._quoted: dict[str, str] = {}
        self._periods: dict[int, tuple[Period, str]] = {}
        # The text from the meter to the cause, by what it is made of, for verdicts that share
        # their numbers' text: plain keys of one meter and period with the same numbers share it.
        self._middles: dict[tuple[str, int, str, str, str, str, str], str] = {}
        # The last customer's and invoice ids' texts: a customer's keys come one after another.
        self._customer: tuple[str, str] = ("", '""')
        self._invoices: tuple[tuple[str, ...], str] = ((), "[]")

    def __call__(self, line: ReconLine) -> str:
        try:
            return self._text(line)
        except orjson.JSONEncodeError:  # a text orjson refuses (a lone surrogate): as line_text writes it
            return line_text(line_json(line))

    def _quote(self, text: str) -> str:
        quoted = self._quoted.get(text)
        if quoted is None:
            quoted = self._quoted[text] = _json(text)
        return quoted

    def _period(self, period: Period) -> str:
        known = self._periods.get(id(period))  # the entry keeps the period, so its id is never reused
        if known is None:
            start, end = _json(period.start.isoformat()), _json(period.end.isoformat())
            known = self._periods[id(period)] = (
                period,
                f'{_json(period.label)},"period_start":{start},"period_end":{end}',
            )
        return known[1]

    def _middle(self, line: ReconLine) -> str:
        shared = line.numbers_json
        if shared is None:
            return self._middle_text(line, numbers_json(_numbers(line)))
        key = (line.meter, id(line.period), shared, line.currency, line.klass, line.break_at, line.cause)
        middle = self._middles.get(key)
        if middle is None:
            if len(self._middles) >= MIDDLES_LIMIT:
                self._middles.clear()
            middle = self._middles[key] = self._middle_text(line, shared)
        return middle

    def _middle_text(self, line: ReconLine, numbers: str) -> str:
        quote = self._quote
        return _MIDDLE_TEMPLATE % (
            quote(line.meter),
            self._period(line.period),
            numbers,
            quote(line.currency),
            quote(line.klass),
            quote(line.break_at),
            quote(line.cause),
        )

    def _text(self, line: ReconLine) -> str:
        evidence = line.evidence
        customer, invoices, clears = line.customer_id, evidence.invoice_ids, evidence.clears
        if customer != self._customer[0]:
            self._customer = (customer, _json(customer))
        if invoices != self._invoices[0]:
            self._invoices = (invoices, _ids(invoices))
        return _LINE_TEMPLATE % (
            self._customer[1],
            self._middle(line),
            _ids(evidence.duplicate_event_ids),
            _ids(evidence.late_event_ids),
            _ids(evidence.catchup_event_ids),
            _ids(evidence.invoice_line_ids),
            self._invoices[1],
            _json([{"customer_id": c.customer_id, "meter": c.meter, "period": c.period} for c in clears])
            if clears
            else "[]",
        )


@dataclass(slots=True)  # not frozen: a frozen __init__ costs five times a plain one's
class StoredLine:
    """A report line as the store keeps it: its key and class (the store's index), its text,
    and whether the store must read it (a discrepancy, a timing item, or a line that clears one)."""

    customer_id: str
    meter: str
    period: str
    klass: str
    text: str
    followed: bool


def stored_lines(report: Report) -> Iterator[StoredLine]:
    """The report's lines for the store, in order, one at a time."""
    write = LineWriter()
    for line in report.lines:
        yield StoredLine(line.customer_id, line.meter, line.period.label, line.klass, write(line), is_followed(line))


def is_followed(line: ReconLine) -> bool:
    """Whether the store reads the line: a discrepancy, a timing item, or a line clearing one."""
    return line.klass != "match" or bool(line.evidence.clears)


@dataclass(slots=True)
class StoredPage:
    """Consecutive report lines as the store keeps them: their texts joined by newlines (a
    line's text never holds one), in UTF-8, each line's key and class (the store's index), and
    the texts of the lines the store must read (`StoredLine.followed`), in order."""

    data: bytes
    customers: list[str]
    meters: list[str]
    periods: list[str]
    classes: list[str]
    followed: list[str]


@dataclass(frozen=True)
class StoredPages:
    """A run's lines handed to the store a page at a time (`bot.bulk` makes them so), rather
    than as `StoredLine`s."""

    pages: Iterable[StoredPage]


def pages_of(lines: Iterable[StoredLine], size: int) -> Iterator[StoredPage]:
    """`lines` in pages of `size` lines (the last may hold fewer)."""
    remaining = iter(lines)
    while chunk := list(islice(remaining, size)):
        yield StoredPage(
            "\n".join([ln.text for ln in chunk]).encode(),
            [ln.customer_id for ln in chunk],
            [ln.meter for ln in chunk],
            [ln.period for ln in chunk],
            [ln.klass for ln in chunk],
            [ln.text for ln in chunk if ln.followed],
        )


def stored_from_json(lines: Iterable[dict[str, Any]]) -> Iterator[StoredLine]:
    """Lines in the contract's shape (`line_json`) for the store."""
    for line in lines:
        followed = line["class"] != "match" or bool(line["evidence"]["clears"])
        yield StoredLine(line["customer_id"], line["meter"], line["period"], line["class"], line_text(line), followed)


def report_lines(report: Report) -> Iterator[dict[str, Any]]:
    """The report's lines in its (sorted) order, one at a time, so a writer can stream them."""
    periods: dict[int, tuple[str, str, str]] = {}
    for line in report.lines:
        yield line_json(line, periods)


def summary_json(lines: tuple[ReconLine, ...] | list[ReconLine]) -> dict[str, Any]:
    """Counts and amounts by class; `amount` is null when a class mixes currencies."""
    return summary_of((line.klass, line.currency, line.delta_amount, 1) for line in lines)


def summary_of(tallies: Iterable[tuple[str, str, Decimal, int]]) -> dict[str, Any]:
    """`summary_json` of lines given as (class, currency, delta_amount, how many lines)."""
    counts: dict[str, int] = dict.fromkeys(CLASSES, 0)
    amounts: dict[str, dict[str, Decimal]] = {c: defaultdict(Decimal) for c in CLASSES}
    for klass, currency, delta, times in tallies:
        counts[klass] += times
        amounts[klass][currency] += delta if times == 1 else delta * times
    classes = {}
    for klass in CLASSES:
        by_currency = {cur: number(round_money(total, cur)) for cur, total in sorted(amounts[klass].items()) if cur}
        single = next(iter(by_currency.values())) if len(by_currency) == 1 else None
        classes[klass] = {
            "count": counts[klass],
            "amount": single if by_currency else "0.00",
            "amounts": by_currency,
        }
    return {"keys": sum(counts.values()), "matched": counts["match"], "classes": classes}


def report_head(report: Report, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report without its lines: run id, periods and summary (`extra` adds summary facts
    such as out-of-scope counts)."""
    return head_json(report.run_id, report.periods, summary_json(report.lines), extra)


def head_json(
    run_id: str, periods: tuple[Period, ...], summary: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`report_head` of a run whose summary is made already."""
    summary.update(extra or {})
    return {
        "run_id": run_id,
        "period": {
            "start": periods[0].start.isoformat(),
            "end": periods[-1].end.isoformat(),
            "periods": [p.label for p in periods],
        },
        "summary": summary,
    }


def report_json(report: Report, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole report, its lines included."""
    return {**report_head(report, extra), "lines": list(report_lines(report))}


def csv_row(line: dict[str, Any]) -> list[str]:
    """One report line (as `line_json` gives it) flattened for CSV; id lists joined by spaces."""
    evidence = line["evidence"]
    flat = {**line, **{k: " ".join(v) for k, v in evidence.items() if k != "clears"}}
    flat["clears"] = " ".join(f"{c['customer_id']}/{c['meter']}/{c['period']}" for c in evidence["clears"])
    return [str(flat[column]) for column in CSV_COLUMNS]
