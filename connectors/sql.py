"""Raw usage events in a database table, aggregated where they live.

The database ships no event: it filters the run's time range, finds the event ids
seen more than once, buckets on the run's timeline and sums per customer × meter ×
segment, in a few statements that read one REPEATABLE READ snapshot; only those
aggregates, the duplicated ids and the (capped) evidence ids come back. The
semantics are those of `connectors.files.RawEventsFile`:

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
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DataError, NoSuchModuleError, NoSuchTableError, SQLAlchemyError

from connectors.base import ConnectorError, InputError
from rules.config import RawTable
from rules.models import RawAggregate
from rules.timeline import Timeline

TEXT = sa.Text()
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
        run's range give the same digest, whatever else the table holds. Call it after aggregate()."""
        if self._digest is None:
            raise ConnectorError(f"{self.label}: fingerprint() before aggregate(): nothing read yet")
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
        rows = self._run(timeline, evidence_limit, zone, customers, lambda conn, s: conn.execute(s).fetchall())
        aggregates = _merge(rows, evidence_limit)
        self._digest = _digest(aggregates)
        return aggregates

    def plans(self, timeline: Timeline, evidence_limit: int, zone: str = "UTC") -> list[str]:
        """EXPLAIN ANALYZE (PostgreSQL) of each statement `aggregate()` runs, run the same way."""
        plans: list[str] = []

        def explain(conn: sa.Connection, statement: sa.Select) -> list[Any]:
            compiled = statement.compile(conn, compile_kwargs={"render_postcompile": True})
            lines = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, COSTS OFF) {compiled}", compiled.params).scalars()
            plans.append("\n".join(lines))
            return conn.execute(statement).fetchall()

        self._run(timeline, evidence_limit, zone, frozenset(), explain)
        return plans

    def _run(
        self,
        timeline: Timeline,
        evidence_limit: int,
        zone: str,
        customers: frozenset[str],
        execute: Callable[[sa.Connection, sa.Select], list[Any]],
    ) -> list[Any]:
        """Run the statements in one read-only snapshot through `execute`; the aggregation's rows."""
        try:
            with self.engine.connect() as conn:
                postgres = conn.dialect.name == "postgresql"
                if postgres:
                    conn.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
                    conn.execute(sa.text("SET LOCAL TIME ZONE 'UTC'"))
                table, types = self._columns(conn)
                query = Aggregation(table, self.table, types, timeline, customers)
                duplicates: list[str] = []
                if not self._unique_ids(conn):  # a key on event_id: no copies to look for
                    duplicates = sorted(row[0] for row in execute(conn, query.duplicated_ids()))
                rows: list[Any] = []
                for number, statement in enumerate(query.statements(duplicates, max(evidence_limit, 0), zone)):
                    if number == 0 and postgres:
                        # The per-key sums are one hash aggregation; PostgreSQL cannot estimate
                        # the groups of the bucket expressions and would otherwise sort every row.
                        conn.execute(sa.text("SET LOCAL enable_sort = off"))
                    rows.extend(execute(conn, statement))
                    if number == 0 and postgres:
                        conn.execute(sa.text("SET LOCAL enable_sort = on"))
                if any(row[-1] for row in rows):
                    raise self._bad_row(conn, query)
                return rows
        except DataError as exc:  # a value the column's cast refuses: the data is at fault
            raise InputError(f"{self.label}: {_first_line(exc)}") from None
        except SQLAlchemyError as exc:
            raise ConnectorError(f"{self.label}: {_first_line(exc)}") from None

    def _bad_row(self, conn: sa.Connection, query: Aggregation) -> InputError:
        row = conn.execute(query.first_bad()).one()
        field = row.bad
        column = self.table.column(field)
        where = f"event_id {row.event_id!r}" if row.event_id else "a row"
        if field == "event_id":
            where = f"a row of customer_id {row.customer_id!r}" if row.customer_id else "a row"
        return InputError(f"{self.label}: {where}: {column}: is empty")


class Aggregation:
    """The aggregation statement for one run, as SQLAlchemy Core expressions."""

    def __init__(
        self,
        table: sa.TableClause,
        names: RawTable,
        types: dict[str, Any],
        timeline: Timeline,
        customers: frozenset[str],
    ) -> None:
        self.timeline = timeline
        self.customers = customers
        self.columns = _parsed(table, names, types)
        self.table = table

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

    def duplicated_ids(self) -> sa.Select:
        """The event ids seen more than once in the run's range."""
        src = self.candidates()
        return (
            sa.select(src.c.event_id)
            .where(src.c.event_id.is_not(None))
            .group_by(src.c.event_id)
            .having(sa.func.count() > 1)
        )

    def statements(self, duplicates: list[str], limit: int, zone: str) -> list[sa.Select]:
        """The aggregation, in statements that each plan well, given the duplicated ids.

        1. every event seen once, summed per key: a plain hash aggregation (the bare GROUP BY's
           shape, parallel where the database can);
        2. the late ones among them, ranked by id within their key: at most `limit` ids each;
        3. the copies of the duplicated events: the first received kept, the rest counted.
        Nothing sorts the whole table; `_merge` adds the three up per key.
        """
        src = self.placed()
        dup = sa.bindparam("duplicates", duplicates, type_=postgresql.ARRAY(TEXT))
        is_dup = src.c.event_id == sa.any_(dup)
        once = sa.or_(src.c.event_id.is_(None), sa.not_(is_dup)) if duplicates else sa.true()
        late = src.c.window_no > src.c.period_no
        receiving = sa.case((late, src.c.window_no), else_=sa.null())
        origin = sa.case((src.c.segment_no == -1, _month_label(src.c.ts, zone)), else_=sa.null())
        key = (src.c.customer_id, src.c.meter, src.c.segment_no, receiving, origin)
        labels = ("customer_id", "meter", "segment_no", "receiving", "origin")
        keyed = [k.label(n) for k, n in zip(key, labels, strict=True)]
        sums = (
            sa.select(
                *keyed,
                sa.func.sum(src.c.qty).label("quantity"),
                sa.func.count().label("events"),
                sa.null().label("late_ids"),
                sa.null().label("dup_ids"),
                sa.literal(0).label("dropped_copies"),
                sa.literal(0).label("conflicts"),
                sa.func.max(sa.case((src.c.bad.is_not(None), 1), else_=0)).label("has_bad"),
            )
            .where(once)
            .group_by(*key)
        )
        statements = [sums]
        if limit > 0:
            rank = sa.func.row_number().over(partition_by=key[:4], order_by=_bytewise(src.c.event_id))
            late_rows = sa.select(*keyed, src.c.event_id, rank.label("rank")).where(once, late).subquery("late")
            lr = late_rows.c
            statements.append(
                sa.select(
                    *(lr[n] for n in labels),
                    sa.null().label("quantity"),
                    sa.literal(0).label("events"),
                    _ids(lr.event_id, lr["rank"] <= sa.bindparam("limit", limit)).label("late_ids"),
                    sa.null().label("dup_ids"),
                    sa.literal(0).label("dropped_copies"),
                    sa.literal(0).label("conflicts"),
                    sa.literal(0).label("has_bad"),
                ).group_by(*(lr[n] for n in labels))
            )
        if duplicates:
            statements.append(self._copies(src, is_dup, key, labels, limit))
        return statements

    def _copies(self, src: sa.Subquery, is_dup: Any, key: tuple[Any, ...], labels: tuple[str, ...], limit: int):
        same_id = {"partition_by": src.c.event_id}
        first_copy = sa.func.row_number().over(
            **same_id,
            order_by=(
                sa.func.coalesce(src.c.rcv, src.c.ts),
                src.c.qty,
                _bytewise(src.c.customer_id),
                _bytewise(src.c.meter),
                src.c.ts,
            ),
        )
        copies = sa.select(
            *(k.label(n) for k, n in zip(key, labels, strict=True)),
            src.c.event_id,
            src.c.qty,
            src.c.bad,
            first_copy.label("copy"),
            sa.func.count().over(**same_id).label("copies"),
            (sa.func.min(src.c.qty).over(**same_id) != sa.func.max(src.c.qty).over(**same_id)).label("conflict"),
        ).where(is_dup)
        copies = copies.subquery("copies")
        c = copies.c
        rank = sa.func.row_number().over(partition_by=[c[n] for n in labels[:4]], order_by=_bytewise(c.event_id))
        kept = sa.select(*c, rank.label("rank")).where(sa.or_(c.copy == 1, c.bad.is_not(None))).subquery("kept")
        k = kept.c
        shown = k["rank"] <= sa.bindparam("limit", limit)
        return sa.select(
            *(k[n] for n in labels),
            sa.func.sum(k.qty).label("quantity"),
            sa.func.count().label("events"),
            _ids(k.event_id, sa.and_(k.receiving.is_not(None), shown)).label("late_ids"),
            _ids(k.event_id, shown).label("dup_ids"),
            sa.func.sum(k.copies - 1).label("dropped_copies"),
            sa.func.sum(sa.case((k.conflict, 1), else_=0)).label("conflicts"),
            sa.func.max(sa.case((k.bad.is_not(None), 1), else_=0)).label("has_bad"),
        ).group_by(*(k[n] for n in labels))

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


class _Key:
    """What the statements' rows say about one customer × meter × segment × receiving period."""

    __slots__ = ("quantity", "events", "late", "dups", "dropped", "conflicts", "origins")

    def __init__(self) -> None:
        self.quantity, self.events, self.dropped, self.conflicts = Decimal(0), 0, 0, 0
        self.late: list[str] = []
        self.dups: list[str] = []
        self.origins: set[str] = set()


def _merge(rows: Iterable[Any], limit: int) -> list[RawAggregate]:
    """One aggregate per customer × meter × segment × receiving period, from the statements'
    rows (rows before the timeline arrive split by origin month); the smallest `limit` ids."""
    merged: dict[tuple[Any, ...], _Key] = {}
    limit = max(limit, 0)
    for customer, meter, segment, receiving, origin, quantity, events, late, dups, dropped, conflicts, _ in rows:
        into = merged.get((customer, meter, segment, receiving))
        if into is None:
            into = merged[(customer, meter, segment, receiving)] = _Key()
        if quantity is not None:
            into.quantity += quantity
        into.events += events
        if late:
            into.late = sorted([*into.late, *late])[:limit]
        if dups:
            into.dups = sorted([*into.dups, *dups])[:limit]
        into.dropped += dropped
        into.conflicts += conflicts
        if origin is not None:
            into.origins.add(origin)
    return [
        RawAggregate(
            customer_id=customer,
            meter=meter,
            segment=None if segment is None or segment < 0 else segment,
            receiving=receiving,
            quantity=Decimal(v.quantity).normalize(),
            events=v.events,
            late_event_ids=tuple(v.late),
            duplicate_event_ids=tuple(v.dups),
            dropped_copies=int(v.dropped),
            conflicting_copies=int(v.conflicts),
            origin_periods=tuple(sorted(v.origins)),
        )
        for (customer, meter, segment, receiving), v in merged.items()
    ]


def _digest(aggregates: list[RawAggregate]) -> str:
    digest = hashlib.sha256()
    for a in sorted(
        aggregates, key=lambda a: (a.customer_id, a.meter, -1 if a.segment is None else a.segment, a.receiving or -1)
    ):
        digest.update(repr(a).encode())
    return digest.hexdigest()


def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
