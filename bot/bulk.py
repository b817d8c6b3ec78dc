"""A book's keys judged in bulk: each shape of plain key once, every other key in Python.

Most keys of a book are plain: one usage line in the meter's currency, at most one metered
row and one raw aggregate, nothing late, no catch-up, no duplicates, and a meter without
plan changes. Such a key's verdict depends on its shape (meter, period, raw quantity,
metered quantity, the line's quantity and amount) and not on its customer or ids, and a
book's 500,000 keys have a few thousand shapes. So DuckDB joins the three records by key;
the rules judge each shape once, on a stand-in key whose customer and ids are markers
(`rules.classify.judge`, the same call as for any key); and DuckDB writes every plain key's
line from its shape's text, with the key's customer and ids where the markers were. Only
ids that JSON writes as they are go in that way; a key with any other is judged in Python,
like every key that is not plain. The lines come out in the report's order, as the store
takes them, and are byte for byte the lines `rules.reconcile` gives (a test holds the two
to that on random books).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from bot.pages import LINES_PER_PAGE
from connectors.files import Columns, aggregate_quantity, connect, raw_aggregates
from rules.classify import judge
from rules.config import Config
from rules.match import KeyFacts, join
from rules.models import InvoiceLine, MeteredRecord, RawAggregate, Report
from rules.reconcile import judge_all
from rules.report import LineWriter, StoredPage, StoredPages, is_followed, stored_lines, summary_of
from rules.timeline import Timeline

if TYPE_CHECKING:
    import duckdb

# The stand-in key's customer and ids: texts no file holds, which JSON writes escaped.
MARKERS = ("\x00customer\x00", "\x00line\x00", "\x00invoice\x00")
# A text JSON writes as it is: no quote, backslash or control character.
_AS_IS = """NOT regexp_matches(customer_id || line_id || invoice_id, '[[:cntrl:]"\\\\]')"""
_SHAPE = ("meter", "p", "seg", "raw_q", "met_q", "inv_q", "inv_a")
_PARTS = tuple(f"p{i}" for i in range(len(MARKERS) + 1))  # a template's text around the markers
_METERED, _INVOICED = ("met_t", "met_bounds"), ("inv_t", "inv_bounds")  # a billing table, its periods


@dataclass
class Judged:
    """A book's verdicts: the report's summary (`rules.report.summary_json`, out-of-scope
    counts included) and its lines, in order, a page at a time, made as they are taken."""

    summary: dict[str, Any]
    pages: StoredPages


def judge_book(
    config: Config,
    timeline: Timeline,
    raw: pa.Table,
    metered: Columns,
    invoiced: Columns,
    page_size: int = LINES_PER_PAGE,
) -> Judged:
    """Every key of the book on `timeline`: `raw` as `RawEventsFile.aggregate_table` gives it,
    the billing side as `FileBilling.columns` does; the lines in pages of `page_size`."""
    con = connect()
    _register(con, config, timeline, raw, metered, invoiced)
    con.execute(_KEYS_SQL.format(periods=len(timeline.periods), as_is=_AS_IS))
    tallies = _judge_shapes(con, config, timeline, metered, invoiced)
    others, scope = _judge_others(con, config, timeline, raw, metered, invoiced)
    tallies += [(ln.klass, ln.currency, ln.delta_amount, 1) for ln in others.lines]
    con.register("others", _others_table(others))
    return Judged({**summary_of(tallies), **scope}, StoredPages(_pages(con, timeline, page_size)))


def _register(
    con: duckdb.DuckDBPyConnection,
    config: Config,
    timeline: Timeline,
    raw: pa.Table,
    metered: Columns,
    invoiced: Columns,
) -> None:
    con.register("raw_t", raw.append_column("r", _row_numbers(raw.num_rows)))
    for (name, bounds), columns, texts in (
        (_METERED, metered, ("customer_id", "meter")),
        (_INVOICED, invoiced, ("customer_id", "meter", "currency", "kind")),
    ):
        table = columns.rows
        for column in texts:
            table = table.set_column(table.schema.get_field_index(column), column, columns.texts(column))
        con.register(name, table.append_column("row_no", _row_numbers(len(columns))))
        con.register(bounds, _bounds(columns, timeline))
    segments = [(i, s.period_index) for i, s in enumerate(timeline.segments)]
    con.register("segs", pa.table({"segment": [i for i, _ in segments], "p": [p for _, p in segments]}))
    plain = {name: m.currency for name, m in config.meters.items() if not m.plan}
    schema = pa.schema([("meter", pa.string()), ("meter_currency", pa.string())])
    con.register("meters_t", pa.table({"meter": list(plain), "meter_currency": list(plain.values())}, schema=schema))


def _row_numbers(count: int) -> pa.Array:
    """0, 1, ... count - 1, made in Arrow (a tenth of the time of a Python range's)."""
    return pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), count)), 1)


def _bounds(columns: Columns, timeline: Timeline) -> pa.Table:
    """Each distinct (period_start, period_end) of a billing table and the period holding it."""
    pairs = columns.spans()
    starts, ends = columns.distinct["period_start"], columns.distinct["period_end"]
    found = [timeline.period_of(starts[s], ends[e]) for s, e in pairs]
    return pa.table(
        {"s": [s for s, _ in pairs], "e": [e for _, e in pairs], "p": found},
        schema=pa.schema([("s", pa.int32()), ("e", pa.int32()), ("p", pa.int64())]),
    )


# Every key of the book with what decides whether it is plain and, if so, its shape: the
# three records' rows (and the catch-up a raw row brings to a later period) in one stream,
# summed by key in one pass.
_KEYS_SQL = """
CREATE TEMP TABLE keys AS
WITH raw_k AS (
    SELECT r, customer_id, meter, segs.p, receiving,
        receiving IS NOT NULL OR segment IS NULL OR coalesce(len(late_event_ids), 0) > 0
            OR coalesce(len(duplicate_event_ids), 0) > 0 OR dropped_copies > 0 OR conflicting_copies > 0
            OR coalesce(len(origin_periods), 0) > 0 AS odd
    FROM raw_t LEFT JOIN segs USING (segment)
),
facts AS (
    -- Each record as one row of its key (and a late raw row once more, for the period it is
    -- caught up in), carrying its row number: the grouping moves numbers, not texts.
    SELECT customer_id, meter, p, 1 AS raw_n, r AS raw_r, odd, false AS targeted,
        0 AS met_n, NULL::INTEGER AS met_q, 0 AS inv_n, NULL::BIGINT AS inv_row
    FROM raw_k WHERE p IS NOT NULL
    UNION ALL
    SELECT customer_id, meter, receiving, 0, NULL, false, true, 0, NULL, 0, NULL
    FROM raw_k WHERE receiving >= 0 AND receiving < {periods}
    UNION ALL
    SELECT customer_id, meter, b.p, 0, NULL, false, false, 1, quantity, 0, NULL
    FROM met_t JOIN met_bounds AS b ON period_start = b.s AND period_end = b.e
    WHERE b.p IS NOT NULL
    UNION ALL
    SELECT customer_id, meter, b.p, 0, NULL, false, false, 0, NULL, 1, row_no
    FROM inv_t JOIN inv_bounds AS b ON period_start = b.s AND period_end = b.e
    WHERE b.p IS NOT NULL
),
grouped AS (
    -- any_value takes the first value that is not NULL: a plain key has one of each record at most
    SELECT customer_id, meter, p, sum(raw_n) AS raw_n, any_value(raw_r) AS raw_r, bool_or(odd) AS odd,
        bool_or(targeted) AS targeted, sum(met_n) AS met_n, any_value(met_q) AS met_q, sum(inv_n) AS inv_n,
        any_value(inv_row) AS inv_row
    FROM facts GROUP BY customer_id, meter, p
),
joined AS (
    SELECT g.*, raw_t.quantity AS raw_q, raw_t.segment AS seg, inv_t.quantity AS inv_q, inv_t.amount AS inv_a,
        inv_t.currency, inv_t.kind, inv_t.line_id, inv_t.invoice_id
    FROM grouped AS g LEFT JOIN raw_t ON raw_t.r = g.raw_r LEFT JOIN inv_t ON inv_t.row_no = g.inv_row
)
SELECT joined.*, coalesce(
    meter_currency = currency AND customer_id <> '' AND inv_n = 1 AND kind = 'usage' AND met_n <= 1
    AND raw_n <= 1 AND NOT odd AND NOT targeted AND {as_is}, false) AS plain
FROM joined LEFT JOIN meters_t USING (meter)
"""

_TEMPLATES = pa.schema(
    [
        ("meter", pa.string()),
        ("p", pa.int64()),
        ("seg", pa.int64()),
        ("raw_q", pa.string()),
        ("met_q", pa.int64()),
        ("inv_q", pa.int64()),
        ("inv_a", pa.int64()),
        ("klass", pa.string()),
        ("followed", pa.bool_()),
        *((part, pa.string()) for part in _PARTS),
    ]
)
_SAME_SHAPE = " AND ".join(f"k.{c} IS NOT DISTINCT FROM t.{c}" for c in _SHAPE)


def _judge_shapes(
    con: duckdb.DuckDBPyConnection, config: Config, timeline: Timeline, metered: Columns, invoiced: Columns
) -> list[tuple[str, str, Decimal, int]]:
    """Each plain key's shape judged once; its line's text split where the key's customer and
    ids go (table `templates`). A shape whose text does not split so is not plain after all."""
    shapes = con.execute(f"SELECT {', '.join(_SHAPE)}, count(*) FROM keys WHERE plain GROUP BY ALL").fetchall()
    write = LineWriter()
    segments = dict(enumerate(timeline.segments))
    markers = [orjson.dumps(m).decode()[1:-1] for m in MARKERS]
    rows: dict[str, list[Any]] = {name: [] for name in (*_SHAPE, "klass", "followed", *_PARTS)}
    tallies = []
    for *shape, count in shapes:
        meter, p, seg, raw_q, met_q, inv_q, inv_a = shape
        verdict = judge(
            _stand_in(config, timeline, shape, metered.distinct, invoiced.distinct),
            config.meters[meter],
            timeline.periods[p],
            segments,
            config.evidence_limit,
        )
        parts = _split(write(verdict), markers)
        if parts is None:
            continue
        for name, value in zip(_SHAPE, shape, strict=True):
            rows[name].append(value)
        rows["klass"].append(verdict.klass)
        rows["followed"].append(is_followed(verdict))
        for name, part in zip(_PARTS, parts, strict=True):
            rows[name].append(part)
        tallies.append((verdict.klass, verdict.currency, verdict.delta_amount, count))
    con.register("templates", pa.table(rows, schema=_TEMPLATES))
    if len(rows["meter"]) < len(shapes):  # a shape not written from a template: its keys are judged in Python
        con.execute(f"""
            UPDATE keys AS k SET plain = false
            WHERE plain AND NOT EXISTS (SELECT 1 FROM templates AS t WHERE {_SAME_SHAPE})""")
    return tallies


def _stand_in(
    config: Config,
    timeline: Timeline,
    shape: list[Any],
    metered: dict[str, list[Any]],
    invoiced: dict[str, list[Any]],
) -> KeyFacts:
    """The facts of a key of this shape (`_SHAPE`'s fields) whose customer and ids are the
    markers, joined as any key's are; `metered` and `invoiced` are the billing columns' distinct
    values."""
    meter, p, seg, raw_q, met_q, inv_q, inv_a = shape
    customer, line_id, invoice_id = MARKERS
    start, end = timeline.periods[p].start, timeline.periods[p].end
    raw = [RawAggregate(customer, meter, seg, None, aggregate_quantity(raw_q), 1)] if raw_q is not None else []
    met = [MeteredRecord(customer, meter, start, end, metered["quantity"][met_q])] if met_q is not None else []
    quantity, amount = invoiced["quantity"][inv_q], invoiced["amount"][inv_a]
    currency = config.meters[meter].currency
    line = InvoiceLine(invoice_id, line_id, customer, meter, start, end, quantity, amount, currency, "usage")
    return join(timeline, raw, met, [line]).facts[(customer, meter, p)]


def _split(text: str, markers: list[str]) -> list[str] | None:
    """`text` cut at each marker, which must each stand once, in order."""
    parts = []
    for marker in markers:
        head, found, text = text.partition(marker)
        if not found or marker in text:
            return None
        parts.append(head)
    return [*parts, text]


def _judge_others(
    con: duckdb.DuckDBPyConnection,
    config: Config,
    timeline: Timeline,
    raw: pa.Table,
    metered: Columns,
    invoiced: Columns,
) -> tuple[Report, dict[str, Any]]:
    """The keys that are not plain, joined and judged in Python from their records (and the
    records no period holds, counted as out of scope)."""
    # The records of the keys that are not plain, and those no period holds, in file order.
    con.execute("CREATE TEMP TABLE others_k AS SELECT customer_id, meter, p FROM keys WHERE NOT plain")
    raw_rows = con.sql("""
        SELECT r FROM raw_t LEFT JOIN segs USING (segment)
        WHERE p IS NULL OR (customer_id, meter, p) IN (SELECT (customer_id, meter, p) FROM others_k)
        ORDER BY r""").to_arrow_table()
    met_rows, inv_rows = (
        con.sql(f"""
            SELECT row_no FROM {table} AS x
                LEFT JOIN {bounds} AS b ON x.period_start = b.s AND x.period_end = b.e
            WHERE b.p IS NULL OR (x.customer_id, x.meter, b.p) IN (SELECT (customer_id, meter, p) FROM others_k)
            ORDER BY row_no""").to_arrow_table()
        for table, bounds in (_METERED, _INVOICED)
    )
    joined = join(
        timeline,
        raw_aggregates(raw.take(raw_rows.column(0))),
        metered.records(MeteredRecord, met_rows.column(0)),
        invoiced.records(InvoiceLine, inv_rows.column(0)),
    )
    scope = {"out_of_scope": {"metered": joined.out_of_scope_metered, "invoice_lines": joined.out_of_scope_lines}}
    report, _ = judge_all(config, timeline, joined, run_id="")  # only its lines are kept
    return report, scope


_OTHERS = pa.schema(
    [
        ("customer_id", pa.string()),
        ("meter", pa.string()),
        ("p", pa.int64()),
        ("klass", pa.string()),
        ("followed", pa.bool_()),
        ("text", pa.string()),
    ]
)


def _others_table(report: Report) -> pa.Table:
    """The lines of the keys judged in Python, with their keys, for the final ordered query."""
    index = {id(period): i for i, period in enumerate(report.periods)}
    rows: dict[str, list[Any]] = {name: [] for name in _OTHERS.names}
    for verdict, stored in zip(report.lines, stored_lines(report), strict=True):
        rows["customer_id"].append(stored.customer_id)
        rows["meter"].append(stored.meter)
        rows["p"].append(index[id(verdict.period)])
        rows["klass"].append(stored.klass)
        rows["followed"].append(stored.followed)
        rows["text"].append(stored.text)
    return pa.table(rows, schema=_OTHERS)


def _pages(con: duckdb.DuckDBPyConnection, timeline: Timeline, size: int) -> Iterator[StoredPage]:
    """Every line in the report's order, a page of `size` lines at a time: the page's text is
    joined in Arrow, and no Python object is made for a line the store need not read."""
    labels = [p.label for p in timeline.periods]
    reader = con.sql(f"""
        SELECT customer_id, meter, p, klass,
            coalesce(text, concat(p0, customer_id, p1, line_id, p2, invoice_id, p3)) AS text, followed
        FROM (
            SELECT k.customer_id, k.meter, k.p, t.klass, t.followed, t.p0, t.p1, t.p2, t.p3, k.line_id,
                k.invoice_id, NULL AS text
            FROM keys AS k JOIN templates AS t ON {_SAME_SHAPE}
            WHERE k.plain
            UNION ALL
            SELECT customer_id, meter, p, klass, followed, NULL, NULL, NULL, NULL, NULL, NULL, text FROM others
        ) ORDER BY customer_id, meter, p""").to_arrow_reader(size)
    try:
        for batch in reader:
            customers, meters, periods, classes, texts, followed = batch.columns
            whole = pa.ListArray.from_arrays(pa.array([0, len(texts)], pa.int32()), texts)
            yield StoredPage(
                pc.binary_join(whole, "\n")[0].as_buffer().to_pybytes(),
                customers.to_pylist(),
                meters.to_pylist(),
                list(map(labels.__getitem__, periods.to_pylist())),
                classes.to_pylist(),
                pc.filter(texts, followed).to_pylist(),
            )
    finally:  # also when the store stops taking pages (a run done already, a failed insert)
        con.close()
