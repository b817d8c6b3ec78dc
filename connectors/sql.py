"""Raw usage events in a database table, aggregated where they live.

The database ships no event: it filters the run's time range, buckets on the run's
timeline, sums per customer × meter × segment and finds the event ids seen more than
once, in three statements that read one REPEATABLE READ snapshot (`Aggregation`);
only those sums, the few rows that correct them for copies, and the (capped)
evidence ids come back. The semantics are those of `connectors.files.RawEventsFile`:

- rows with a repeated event_id count once: the copy received first (then the
  smallest quantity) is kept, the others are counted as dropped, and copies that
  disagree on quantity are counted as conflicts;
- an event whose timestamp is before the run but that was received inside one of
  its billing windows is a late event of the period that received it;
- a row in the run's range with an empty event_id, customer_id, meter or quantity,
  or any row with no timestamp, stops the run with a one-line error.

Unlike a file, a table is not read whole: copies of an event and bad rows outside
the run's time range (and its late-event windows) are not looked at.

The SQL is built with SQLAlchemy Core: identifiers from the config are quoted by
the dialect, values (instants, customer ids, the evidence limit) are bound
parameters. Quantities are summed exactly: integer columns as integers (the fast
path), anything else as NUMERIC, never as floating point.

PostgreSQL only, each with a plain path for other databases: the copies are found by
a 64-bit hash of the id (`hashtextextended`) rather than the id's text, and the sums
run on one connection while a second one, on the same exported snapshot, looks for
the copies; elsewhere the ids themselves are grouped, one statement after another.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DataError, NoSuchModuleError, NoSuchTableError, SQLAlchemyError

from connectors.base import ConnectorError, InputError
from connectors.files import aggregates_table
from rules.config import RawTable
from rules.models import RawAggregate
from rules.reconcile import without_cyclic_gc
from rules.timeline import Timeline

if TYPE_CHECKING:
    import pyarrow as pa

TEXT = sa.Text()
KEY = ("customer_id", "meter", "segment_no", "receiving", "origin")
# The statements, with their planner settings on PostgreSQL (for the transaction only). The
# sums are one hash aggregation held in memory: PostgreSQL cannot estimate the groups of the
# bucket expressions and would otherwise sort every row. The duplicate search sorts 8-byte
# hashes in memory, faster than a hash table of every id. The other two run beside the sums,
# each in one process: parallel workers would take the cores the sums need.
STATEMENTS: dict[str, dict[str, str]] = {
    "sums": {"enable_sort": "off", "work_mem": "256MB"},
    "duplicates": {"enable_hashagg": "off", "work_mem": "256MB", "max_parallel_workers_per_gather": "0"},
    "evidence": {"max_parallel_workers_per_gather": "0"},
}
SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+-[0-9]+")
DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}


def database_url(spec: str) -> URL:
    """A SQLAlchemy URL from `postgresql://...`, `DIALECT+DRIVER://...` or `env:VARIABLE`."""
    text = spec
    if spec.startswith("env:"):
        name = spec[4:]
        text = os.environ.get(name, "")
        if not text:
            raise InputError(f"sources.raw: environment variable {name} is not set")
    try:
        url = make_url(text)
    except ArgumentError:
        raise InputError(f"sources.raw: not a database URL ({redact(text)})") from None
    if url.drivername in DRIVERS:
        url = url.set(drivername=DRIVERS[url.drivername])
    return url


def redact(url: str | URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except ArgumentError:
        return "<unparseable URL>"
    return parsed.render_as_string(hide_password=True)


class RawEventsSQL:
    """Raw usage events in a table of a database reached through SQLAlchemy."""

    def __init__(self, spec: str, table: RawTable, engine: Engine | None = None) -> None:
        self.url = database_url(spec)
        self.table = table
        self.label = f"{redact(self.url)} table {table.name}"
        if engine is None:
            try:
                engine = sa.create_engine(self.url, poolclass=sa.NullPool)
            except (NoSuchModuleError, ImportError) as exc:
                raise InputError(f"sources.raw: no SQLAlchemy driver for {self.url.drivername!r} ({exc})") from None
        self.engine = engine
        self._read: list[Sums | RawAggregate] | None = None  # what the last aggregate() read
        self._digest: str | None = None

    # The canonical field → quoted column expression, and the column types.
    def _columns(self, conn: sa.Connection) -> tuple[sa.TableClause, dict[str, Any]]:
        schema, _, name = self.table.name.rpartition(".")
        try:
            found = {c["name"]: c["type"] for c in sa.inspect(conn).get_columns(name, schema=schema or None)}
        except NoSuchTableError:
            raise InputError(f"{self.label}: no such table") from None
        wanted = dict(self.table.columns)
        for field in ("event_id", "customer_id", "meter", "timestamp", "quantity"):
            if wanted[field] not in found:
                raise InputError(f"{self.label}: missing column {wanted[field]!r} (sources.raw_table.{field})")
        present = [c for c in wanted.values() if c in found]
        clause = sa.table(name, *(sa.column(c) for c in dict.fromkeys(present)), schema=schema or None)
        types = {field: found.get(column) for field, column in wanted.items()}
        return clause, types

    def _unique_ids(self, conn: sa.Connection) -> bool:
        """Whether a primary key, unique constraint or unique index holds event_id alone."""
        schema, _, name = self.table.name.rpartition(".")
        inspector = sa.inspect(conn)
        column = [self.table.column("event_id")]
        keys = [inspector.get_pk_constraint(name, schema=schema or None).get("constrained_columns") or []]
        keys += [u["column_names"] for u in inspector.get_unique_constraints(name, schema=schema or None)]
        keys += [i["column_names"] for i in inspector.get_indexes(name, schema=schema or None) if i.get("unique")]
        return column in keys

    def fingerprint(self) -> str:
        """The digest of the aggregates the last `aggregate()` returned: the same rows in the
        run's range give the same digest, whatever else the table holds. Call it after
        aggregate(); it is worked out on the first call (a run takes it beside its judging)."""
        if self._digest is None:
            if self._read is None:
                raise ConnectorError(f"{self.label}: fingerprint() before aggregate(): nothing read yet")
            self._digest, self._read = _digest(self._read), None
        return f"sql:{self._digest}"

    def aggregate(
        self,
        timeline: Timeline,
        evidence_limit: int,
        zone: str = "UTC",
        progress: Callable[..., Any] | None = None,
        customers: frozenset[str] = frozenset(),
    ) -> list[RawAggregate]:
        """Aggregates on the timeline; with `customers`, only their events are read.
        (`progress` is accepted for the files source's interface; a database shows none.)"""
        merged = self._merged(timeline, evidence_limit, zone, customers)
        return [a if isinstance(a, RawAggregate) else RawAggregate(*a) for a in merged]

    def aggregate_table(
        self,
        timeline: Timeline,
        evidence_limit: int,
        zone: str = "UTC",
        progress: Callable[..., Any] | None = None,
        customers: frozenset[str] = frozenset(),
    ) -> pa.Table:
        """`aggregate`'s records as the Arrow table the files source gives (`bot.bulk` takes it),
        made without a record for the keys that need no correction (nearly all)."""
        return aggregates_table(self._merged(timeline, evidence_limit, zone, customers))

    def _merged(
        self, timeline: Timeline, evidence_limit: int, zone: str, customers: frozenset[str]
    ) -> list[Sums | RawAggregate]:
        """The aggregates as `_merged` gives them, kept for `fingerprint()`."""
        with without_cyclic_gc():
            sums, evidence = self._run(timeline, evidence_limit, zone, customers, _fetch)
            merged = _merged(sums, evidence, evidence_limit)
        self._read, self._digest = merged, None
        return merged

    def plans(self, timeline: Timeline, evidence_limit: int, zone: str = "UTC") -> list[str]:
        """EXPLAIN ANALYZE (PostgreSQL) of each statement `aggregate()` runs, run the same way
        (the sums while the other two run on a second connection); in STATEMENTS' order."""
        plans: dict[str, str] = {}

        def explain(conn: sa.Connection, name: str, statement: sa.Select) -> list[Any]:
            compiled = statement.compile(conn, compile_kwargs={"render_postcompile": True})
            lines = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, COSTS OFF) {compiled}", compiled.params).scalars()
            plans[name] = "\n".join(lines)
            return _fetch(conn, name, statement)

        self._run(timeline, evidence_limit, zone, frozenset(), explain)
        return [plans[name] for name in STATEMENTS if name in plans]

    def _run(
        self,
        timeline: Timeline,
        evidence_limit: int,
        zone: str,
        customers: frozenset[str],
        execute: Callable[[sa.Connection, str, sa.Select], list[Any]],
    ) -> tuple[list[Any], list[Any]]:
        """Run the statements in one read-only snapshot through `execute`: the per-key sums of
        every row, and the evidence rows that correct them (see `Aggregation`). On PostgreSQL
        the sums run while a second connection, on the same snapshot, finds the copies."""
        limit = max(evidence_limit, 0)
        try:
            with self.engine.connect() as conn:
                postgres = conn.dialect.name == "postgresql"
                _begin(conn, postgres)
                table, types = self._columns(conn)
                query = Aggregation(table, self.table, types, timeline, customers, zone, postgres)
                unique = self._unique_ids(conn)  # a key on event_id: no copies to look for

                def copies(other: sa.Connection) -> list[Any]:
                    duplicates = [] if unique else [row[0] for row in run(other, "duplicates", query.duplicated_ids())]
                    return run(other, "evidence", query.evidence(duplicates, limit))

                def run(on: sa.Connection, name: str, statement: sa.Select) -> list[Any]:
                    with _settings(on, STATEMENTS[name] if postgres else {}):
                        return execute(on, name, statement)

                if postgres:
                    snapshot = conn.execute(sa.select(sa.func.pg_export_snapshot())).scalar_one()
                    with ThreadPoolExecutor(max_workers=1) as pool:
                        corrections = pool.submit(self._on_snapshot, snapshot, copies)
                        sums = run(conn, "sums", query.sums())
                        rows = corrections.result()
                else:
                    sums = run(conn, "sums", query.sums())
                    rows = copies(conn)
                if any(row[-1] for row in rows):
                    raise self._bad_row(conn, query)
                return sums, rows
        except DataError as exc:  # a value the column's cast refuses: the data is at fault
            raise InputError(f"{self.label}: {_first_line(exc)}") from None
        except SQLAlchemyError as exc:
            raise ConnectorError(f"{self.label}: {_first_line(exc)}") from None

    def _on_snapshot(self, snapshot: str, work: Callable[[sa.Connection], list[Any]]) -> list[Any]:
        """`work` on a second connection that sees what the first sees (PostgreSQL)."""
        with self.engine.connect() as conn:
            _begin(conn, True, snapshot)
            return work(conn)

    def _bad_row(self, conn: sa.Connection, query: Aggregation) -> InputError:
        row = conn.execute(query.first_bad()).one()
        field = row.bad
        column = self.table.column(field)
        where = f"event_id {row.event_id!r}" if row.event_id else "a row"
        if field == "event_id":
            where = f"a row of customer_id {row.customer_id!r}" if row.customer_id else "a row"
        return InputError(f"{self.label}: {where}: {column}: is empty")


class Aggregation:
    """The aggregation's statements for one run, as SQLAlchemy Core expressions.

    1. `sums`: every row in the run's range summed per key, copies of an event included: one
       hash aggregation, the shape of a bare GROUP BY, in the keys' order;
    2. `duplicated_ids`: the ids seen more than once (on PostgreSQL, the hashes of such ids,
       found by sorting 8-byte hashes instead of hashing every id's text);
    3. `evidence`: the copies of those ids, the late events and the bad rows, few rows: the
       copies beyond the first received, taken off their keys' sums, and the ids shown as
       evidence.
    `_merge` adds 3 to 1 per key.
    """

    def __init__(
        self,
        table: sa.TableClause,
        names: RawTable,
        types: dict[str, Any],
        timeline: Timeline,
        customers: frozenset[str],
        zone: str = "UTC",
        postgres: bool = False,
    ) -> None:
        self.timeline = timeline
        self.customers = customers
        self.columns = _parsed(table, names, types)
        self.table = table
        self.zone = zone
        self.postgres = postgres

    def candidates(self) -> sa.Subquery:
        """The rows that can matter to the run, parsed, each with the name of its first bad field."""
        c = self.columns
        tl = self.timeline
        start, end = _at(tl.start, "start"), _at(tl.end, "end")
        first, last = _at(tl.start + tl.grace, "first_window"), _at(tl.end + tl.grace, "last_window")
        in_range = sa.or_(
            sa.and_(c["ts"] >= start, c["ts"] < end),
            sa.and_(c["ts"] < start, c["rcv"] > first, c["rcv"] <= last),
            c["ts"].is_(None),
        )
        where = [in_range]
        if self.customers:
            where.append(c["customer_id"].in_(sa.bindparam("customers", sorted(self.customers), expanding=True)))
        bad = sa.case(
            (sa.or_(c["event_id"].is_(None), c["event_id"] == ""), "event_id"),
            (sa.or_(c["customer_id"].is_(None), c["customer_id"] == ""), "customer_id"),
            (sa.or_(c["meter"].is_(None), c["meter"] == ""), "meter"),
            (c["ts"].is_(None), "timestamp"),
            (c["qty"].is_(None), "quantity"),
            else_=sa.null(),
        )
        fields = [c[k].label(k) for k in ("event_id", "customer_id", "meter", "ts", "rcv", "qty")]
        return sa.select(*fields, bad.label("bad")).select_from(self.table).where(*where).subquery("src")

    def placed(self) -> sa.Subquery:
        """The candidate rows with their period, segment and billing window numbers."""
        tl = self.timeline
        src = self.candidates()
        period = _bucket(src.c.ts, [p.end for p in tl.periods], tl.start, "p")
        segment = _bucket(src.c.ts, [s.end for s in tl.segments], tl.start, "s")
        window = _window(src.c.rcv, tl)
        return sa.select(
            *src.c, period.label("period_no"), segment.label("segment_no"), window.label("window_no")
        ).subquery("placed")

    def keyed(self) -> sa.Subquery:
        """The placed rows with their key: customer × meter × segment × receiving period, and
        the month of origin of a row before the timeline (a catch-up event's own period)."""
        src = self.placed()
        late = src.c.window_no > src.c.period_no
        receiving = sa.case((late, src.c.window_no), else_=sa.null())
        origin = sa.case((src.c.segment_no == -1, _month_label(src.c.ts, self.zone)), else_=sa.null())
        return sa.select(
            src.c.customer_id,
            src.c.meter,
            src.c.segment_no,
            receiving.label("receiving"),
            origin.label("origin"),
            src.c.event_id,
            src.c.ts,
            src.c.rcv,
            src.c.qty,
            src.c.bad,
        ).subquery("keyed")

    def sums(self) -> sa.Select:
        """Every row summed per key (copies of an event too: `evidence` takes them off), in the
        keys' order (`_merge` then meets a key's rows together, `_digest` a sorted list)."""
        k = self.keyed().c
        key = [k[n] for n in KEY]
        grouped = (
            sa.select(*key, sa.func.sum(k.qty).label("quantity"), sa.func.count().label("events"))
            .group_by(*key)
            .subquery("sums")
        )
        g = grouped.c
        order = (_bytewise(g.customer_id), _bytewise(g.meter), g.segment_no, g.receiving.nulls_first(), g.origin)
        return sa.select(*g).order_by(*order)

    def id_key(self, event_id: Any) -> Any:
        """What finds an event's copies: its id, or on PostgreSQL the id's 64-bit hash (copies
        share it; the rare other id that shares it is told apart by `evidence`)."""
        return sa.func.hashtextextended(event_id, 0, type_=sa.BigInteger()) if self.postgres else event_id

    def duplicated_ids(self) -> sa.Select:
        """The `id_key`s seen more than once in the run's range."""
        src = self.candidates()
        key = self.id_key(src.c.event_id).label("id_key")
        return sa.select(key).where(src.c.event_id.is_not(None)).group_by(key).having(sa.func.count() > 1)

    def evidence(self, duplicates: list[Any], limit: int) -> sa.Select:
        """Per key, the copies of the duplicated events, the late events and the bad rows (the
        last column says whether the key has one): the copies beyond the first received (then
        the smallest quantity) as negative quantities and counts, and at most `limit` late and
        duplicated ids."""
        k = self.keyed().c
        picked = [k.bad.is_not(None)]
        if duplicates:
            kind = postgresql.ARRAY(sa.BigInteger() if self.postgres else TEXT)
            picked.append(self.id_key(k.event_id) == sa.any_(sa.bindparam("duplicates", duplicates, type_=kind)))
        if limit > 0:
            picked.append(k.receiving.is_not(None))
        same_id = {"partition_by": k.event_id}
        first = (sa.func.coalesce(k.rcv, k.ts), k.qty, _bytewise(k.customer_id), _bytewise(k.meter), k.ts)
        rows = (
            sa.select(
                *(k[n] for n in KEY),
                k.event_id,
                k.qty,
                k.bad,
                sa.or_(sa.func.row_number().over(**same_id, order_by=first) == 1, k.bad.is_not(None)).label("kept"),
                sa.func.count().over(**same_id).label("copies"),
                (sa.func.min(k.qty).over(**same_id) != sa.func.max(k.qty).over(**same_id)).label("conflict"),
            )
            .where(sa.or_(*picked))
            .subquery("picked")
        )
        r = rows.c
        key = [r[n] for n in KEY[:4]]
        by_id = {"order_by": _bytewise(r.event_id)}
        ranked = sa.select(
            *r,
            sa.func.row_number().over(partition_by=[*key, r.kept], **by_id).label("late_rank"),
            sa.func.row_number().over(partition_by=[*key, r.kept, r.copies > 1], **by_id).label("dup_rank"),
        ).subquery("ranked")
        c = ranked.c
        dropped = sa.not_(c.kept)
        shown = sa.bindparam("limit", limit)
        return sa.select(
            *(c[n] for n in KEY),
            (-sa.func.sum(sa.case((dropped, c.qty), else_=0))).label("quantity"),
            (-sa.func.sum(sa.case((dropped, 1), else_=0))).label("events"),
            _ids(c.event_id, sa.and_(c.kept, c.receiving.is_not(None), c.late_rank <= shown)).label("late_ids"),
            _ids(c.event_id, sa.and_(c.kept, c.copies > 1, c.dup_rank <= shown)).label("dup_ids"),
            sa.func.sum(sa.case((c.kept, c.copies - 1), else_=0)).label("dropped_copies"),
            sa.func.sum(sa.case((sa.and_(c.kept, c.conflict), 1), else_=0)).label("conflicts"),
            sa.func.max(sa.case((c.bad.is_not(None), 1), else_=0)).label("has_bad"),
        ).group_by(*(c[n] for n in KEY))

    def first_bad(self) -> sa.Select:
        """The first bad row, by event_id (a table has no line numbers)."""
        src = self.candidates()
        return (
            sa.select(src.c.event_id, src.c.customer_id, src.c.bad)
            .where(src.c.bad.is_not(None))
            .order_by(src.c.event_id.asc().nulls_first(), src.c.customer_id)
            .limit(1)
        )


def _parsed(table: sa.TableClause, names: RawTable, types: dict[str, Any]) -> dict[str, Any]:
    """Each canonical field as an expression on the table's column, by the column's type."""

    def col(field: str) -> Any:
        return table.c[names.column(field)]

    def text(field: str) -> Any:
        kind = types[field]
        return col(field) if isinstance(kind, sa.String) else sa.cast(col(field), TEXT)

    def instant(field: str) -> Any:
        kind = types[field]
        if isinstance(kind, sa.DateTime) and kind.timezone:
            return col(field)
        return sa.cast(col(field), sa.DateTime(timezone=True))  # a naive timestamp or a date is UTC

    kind = types["quantity"]
    if isinstance(kind, sa.Integer) or (isinstance(kind, sa.Numeric) and not isinstance(kind, sa.Float)):
        quantity = col("quantity")  # summed exactly by the database as it is
    else:
        quantity = sa.cast(col("quantity"), sa.Numeric())  # a float or a text: exact decimal, never float
    return {
        "event_id": text("event_id"),
        "customer_id": text("customer_id"),
        "meter": text("meter"),
        "ts": instant("timestamp"),
        "rcv": instant("received_at") if types["received_at"] is not None else sa.null(),
        "qty": quantity,
    }


def _at(moment: datetime, name: str) -> sa.BindParameter[datetime]:
    return sa.bindparam(name, moment, type_=sa.DateTime(timezone=True))


def _bucket(column: Any, ends: list[datetime], start: datetime, prefix: str) -> Any:
    """-1 before `start`, then the index of the first end the value is below."""
    whens = [(column < _at(start, f"{prefix}_start"), -1)]
    whens += [(column < _at(end, f"{prefix}_end_{i}"), i) for i, end in enumerate(ends)]
    return sa.case(*whens, else_=sa.null())


def _window(column: Any, timeline: Timeline) -> Any:
    """The index of the billing window `(start + grace, end + grace]` holding `column`."""
    closes = timeline.window_ends()
    whens = [(column.is_(None), sa.null()), (column <= _at(timeline.start + timeline.grace, "w_first"), -1)]
    whens += [(column <= _at(close, f"w_close_{i}"), i) for i, close in enumerate(closes)]
    return sa.case(*whens, else_=len(closes))


def _month_label(column: Any, zone: str) -> Any:
    """`YYYY-MM` of an instant in the config's zone (PostgreSQL spelling)."""
    return sa.func.to_char(sa.func.timezone(sa.bindparam("zone", zone), column), "YYYY-MM")


def _bytewise(column: Any) -> Any:
    """Text ordered by code point, as DuckDB and Python order it, whatever the database's locale."""
    return column.collate("C")


def _ids(column: Any, shown: Any) -> Any:
    """The ids of the rows `shown` (at most `limit` per key and branch), in no order: `_merge` sorts."""
    return sa.func.array_agg(column, type_=postgresql.ARRAY(TEXT)).filter(shown)


def _fetch(conn: sa.Connection, name: str, statement: sa.Select) -> list[Any]:
    return conn.execute(statement).fetchall()


def _begin(conn: sa.Connection, postgres: bool, snapshot: str | None = None) -> None:
    """A read-only REPEATABLE READ transaction in UTC (PostgreSQL), on `snapshot` if given."""
    if not postgres:
        return
    conn.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
    if snapshot is not None:
        if not SNAPSHOT_ID.fullmatch(snapshot):
            raise ConnectorError(f"unexpected snapshot id {snapshot!r}")
        conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot}'")  # takes no parameter
    conn.execute(sa.text("SET LOCAL TIME ZONE 'UTC'"))


@contextmanager
def _settings(conn: sa.Connection, settings: dict[str, str]) -> Iterator[None]:
    """The planner settings for one statement, set for the transaction, then put back."""
    if not settings:
        yield
        return
    names = list(settings)
    before = conn.execute(sa.select(*(sa.func.current_setting(n) for n in names))).one()
    conn.execute(sa.select(*(sa.func.set_config(n, settings[n], True) for n in names)))
    yield
    conn.execute(sa.select(*(sa.func.set_config(n, v, True) for n, v in zip(names, before, strict=True))))


# A key's sums with nothing to correct: RawAggregate's first six fields (the rest are empty).
Sums = tuple[str, str, int | None, int | None, Decimal, int]


def _merged(sums: list[Any], evidence: list[Any], limit: int) -> list[Sums | RawAggregate]:
    """One aggregate per customer × meter × segment × receiving period, in the sums' order:
    the key's sums (rows before the timeline arrive split by origin month) less its dropped
    copies, with the smallest `limit` late and duplicated ids. A key with nothing to correct
    (nearly every key) is given as its `Sums`, the others as records."""
    corrections: dict[tuple[Any, ...], list[Any]] = {}
    for row in evidence:
        corrections.setdefault(tuple(row[:4]), []).append(row)
    aggregates: list[Sums | RawAggregate | None] = []
    merged: dict[tuple[Any, ...], tuple[int, list[Any]]] = {}
    for row in sums:
        customer, meter, segment, receiving, origin, quantity, events = row
        if origin is None and not (corrections and (customer, meter, segment, receiving) in corrections):
            # nearly every key: one row of sums, nothing to take off or show
            aggregates.append(
                (customer, meter, None if segment < 0 else segment, receiving, Decimal(quantity).normalize(), events)
            )
            continue
        key = (customer, meter, segment, receiving)
        if key not in merged:
            merged[key] = (len(aggregates), [])
            aggregates.append(None)
        merged[key][1].append(row)
    for key, (index, rows) in merged.items():
        aggregates[index] = _corrected(key, rows, corrections.get(key, []), limit)
    return [a for a in aggregates if a is not None] if merged else aggregates  # type: ignore[return-value]


def _corrected(key: tuple[Any, ...], sums: list[Any], evidence: list[Any], limit: int) -> RawAggregate | None:
    """A key's sums less its dropped copies, with its evidence; None when every row of it was
    a dropped copy."""
    customer, meter, segment, receiving = key
    quantity, events, dropped, conflicts = Decimal(0), 0, 0, 0
    late: list[str] = []
    dups: list[str] = []
    counts: dict[str | None, int] = {}
    for *_, origin, q, n in sums:
        quantity += q
        events += n
        counts[origin] = counts.get(origin, 0) + n
    for *_, origin, q, n, late_ids, dup_ids, dropped_copies, conflicting, _bad in evidence:
        quantity += q
        events += n
        counts[origin] = counts.get(origin, 0) + n
        late += late_ids or ()
        dups += dup_ids or ()
        dropped += dropped_copies
        conflicts += conflicting
    if not events:
        return None
    return RawAggregate(
        customer_id=customer,
        meter=meter,
        segment=None if segment < 0 else segment,
        receiving=receiving,
        quantity=quantity.normalize(),
        events=events,
        late_event_ids=tuple(sorted(late)[: max(limit, 0)]),
        duplicate_event_ids=tuple(sorted(dups)[: max(limit, 0)]),
        dropped_copies=int(dropped),
        conflicting_copies=int(conflicts),
        origin_periods=tuple(sorted(o for o, n in counts.items() if o is not None and n)),
    )


def _digest(aggregates: list[Sums | RawAggregate]) -> str:
    """The SHA-256 of the aggregates' reprs (as records) in key order (`_shown` writes a repr a
    few times quicker than the dataclass's own; a test holds the two equal)."""
    digest = hashlib.sha256()
    for a in sorted(aggregates, key=_order):
        digest.update(_shown(a).encode())
    return digest.hexdigest()


def _order(a: Sums | RawAggregate) -> tuple[str, str, int, int]:
    customer, meter, segment, receiving = (
        a[:4] if isinstance(a, tuple) else (a.customer_id, a.meter, a.segment, a.receiving)
    )
    return (customer, meter, -1 if segment is None else segment, receiving or -1)


def _shown(a: Sums | RawAggregate) -> str:
    """`repr(a)` of the record (a `Sums` as the record it stands for)."""
    if isinstance(a, tuple):
        customer, meter, segment, receiving, quantity, events = a
        return (
            f"RawAggregate(customer_id={customer!r}, meter={meter!r}, segment={segment!r}, "
            f"receiving={receiving!r}, quantity={quantity!r}, events={events!r}, late_event_ids=(), "
            "duplicate_event_ids=(), dropped_copies=0, conflicting_copies=0, origin_periods=())"
        )
    return (
        f"RawAggregate(customer_id={a.customer_id!r}, meter={a.meter!r}, segment={a.segment!r}, "
        f"receiving={a.receiving!r}, quantity={a.quantity!r}, events={a.events!r}, "
        f"late_event_ids={a.late_event_ids!r}, duplicate_event_ids={a.duplicate_event_ids!r}, "
        f"dropped_copies={a.dropped_copies!r}, conflicting_copies={a.conflicting_copies!r}, "
        f"origin_periods={a.origin_periods!r})"
    )


def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
