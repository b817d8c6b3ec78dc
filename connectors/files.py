"""Canonical records from CSV, JSON Lines and Parquet files, read through DuckDB.

Raw events never come into Python one by one: DuckDB parses, deduplicates,
buckets them on the run's timeline and sums them per customer × meter × segment,
so memory stays bounded whatever the file size. Metered rows and invoice lines
are one per key at most and are parsed in Python, which names the exact line
and field of a bad value.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from operator import attrgetter, itemgetter
from pathlib import Path, PurePosixPath
from sys import intern
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import duckdb

from connectors.base import InputError
from rules.models import InvoiceLine, MeteredRecord, RawAggregate
from rules.timeline import Timeline
from rules.values import parse_decimal, parse_instant

if TYPE_CHECKING:  # DuckDB imports pyarrow when it hands out an Arrow table
    import pyarrow as pa

RAW_COLUMNS = ("event_id", "customer_id", "meter", "timestamp", "quantity")
RAW_FIELDS = (*RAW_COLUMNS, "received_at")  # received_at is optional
METERED_COLUMNS = ("customer_id", "meter", "period_start", "period_end", "quantity")
INVOICED_COLUMNS = (
    "invoice_id",
    "line_id",
    "customer_id",
    "meter",
    "period_start",
    "period_end",
    "quantity",
    "amount",
    "currency",
    "kind",
)
KINDS = ("usage", "credit", "proration", "adjustment")
QUANTITY = "DECIMAL(38,12)"
_NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT")


def connect(memory_limit: str = "1GB") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection in UTC, bounded in memory, spilling to the system's temp folder, and
    handing the memory of a finished query back to the system (it would keep it for the next
    query, while the run goes on in Python), and tracking each query's progress."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = {_quote_literal(str(Path(tempfile.gettempdir()) / 'recon-duckdb'))}")
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET allocator_background_threads = true")
    # Progress is tracked (for the CLI's bar, `query_progress()`), never printed by DuckDB itself.
    con.execute("SET enable_progress_bar = true")
    con.execute("SET enable_progress_bar_print = false")
    return con


REMOTE = re.compile(r"^(s3|s3a|s3n|gs|gcs|r2|https?)://", re.IGNORECASE)
PATTERN = re.compile(r"[*?\[]")


class TableFile:
    """A CSV, JSON Lines or Parquet file, or every file a pattern matches (`events/*.parquet`,
    `s3://bucket/prefix/*.parquet`), as a DuckDB relation of named columns."""

    def __init__(self, path: str | Path, con: duckdb.DuckDBPyConnection | None = None) -> None:
        text = str(path)
        self.remote = bool(REMOTE.match(text))
        self.pattern = self.remote or bool(PATTERN.search(text))
        self.path: Path | str = text if self.remote else Path(text)
        self.con = con or connect()
        suffix = PurePosixPath(urlsplit(text).path if self.remote else text).suffix.lower()
        if suffix not in (".csv", ".jsonl", ".ndjson", ".json", ".parquet"):
            raise InputError(f"{self.path}: unknown file type {suffix!r} (use .csv, .jsonl or .parquet)")
        if self.remote:
            enable_remote(self.con, text)
        elif self.pattern:
            if not glob.glob(text):
                raise InputError(f"{self.path}: no file matches")
        elif not Path(text).is_file():
            raise InputError(f"{self.path}: no such file")
        self.kind = {".parquet": "parquet", ".csv": "csv"}.get(suffix, "jsonl")
        self._types: dict[str, str] | None = None

    def relation(self, columns: tuple[str, ...] = (), filename: bool = False) -> str:
        """A FROM expression; JSON keys are read as text, CSV fields as text; with `filename`,
        each row also names the file it came from."""
        path = _quote_literal(str(self.path))
        named = ", filename = true" if filename else ""
        if self.kind == "parquet":
            return f"read_parquet({path}{named})"
        if self.kind == "csv":
            return f"read_csv({path}, header = true, all_varchar = true{named})"
        spec = ", ".join(f"{_quote_literal(c)}: 'VARCHAR'" for c in columns)
        return f"read_json({path}, format = 'newline_delimited', columns = {{{spec}}}{named})"

    def types(self, expected: tuple[str, ...]) -> dict[str, str]:
        """Column name → DuckDB type; JSON Lines columns are the expected ones."""
        if self._types is None:
            if self.kind == "jsonl":
                self._types = dict.fromkeys(expected, "VARCHAR")
            else:
                try:
                    rows = self.con.execute(f"DESCRIBE SELECT * FROM {self.relation()}").fetchall()
                except duckdb.Error as exc:
                    raise InputError(f"{self.path}: cannot be read: {_first_line(exc)}") from None
                self._types = {name: kind for name, kind, *_ in rows}
        return self._types

    def require(self, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, str]:
        types = self.types(required + optional)
        for column in required:
            if column not in types:
                raise InputError(f"{self.path}: missing column {column!r}")
        return types

    def where(self, index: int) -> str:
        """How a user finds data row `index` (0-based) in the file."""
        if self.kind == "csv":
            return f"line {index + 2}"
        if self.kind == "jsonl":
            return f"line {index + 1}"
        return f"row {index + 1}"

    def fingerprint(self) -> str:
        """The content's hash; for a pattern, each matched file's name and content; for
        remote objects (not downloaded twice), each object's name, size and last-modified time."""
        digest = hashlib.sha256()
        if self.remote:
            # a cursor of its own: a run takes the fingerprint while its scan uses the connection
            with self.con.cursor() as cursor:
                cursor.execute("SET TimeZone = 'UTC'")  # as `connect` sets it: the same text on any host
                listing = cursor.execute(
                    "SELECT filename, size, last_modified FROM read_blob(?) ORDER BY filename", [str(self.path)]
                ).fetchall()
            if not listing:
                raise InputError(f"{self.path}: no file matches")
            for name, size, modified in listing:
                digest.update(f"{name}\t{size}\t{modified.isoformat()}\n".encode())
            return f"objects-sha256:{digest.hexdigest()}"
        files = sorted(glob.glob(str(self.path))) if self.pattern else [str(self.path)]
        for name in files:
            if self.pattern:
                digest.update(f"{name}\n".encode())
            with open(name, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"

    def text_rows(self, columns: tuple[str, ...]) -> Iterator[tuple[int, tuple[str | None, ...]]]:
        """Every row's columns as text, in file order, with the row index."""
        select = ", ".join(f"CAST({_ident(c)} AS VARCHAR)" for c in columns)
        try:
            cursor = self.con.execute(f"SELECT {select} FROM {self.relation(columns)}")
            index = 0
            while batch := cursor.fetchmany(10_000):
                for row in batch:
                    yield index, row
                    index += 1
        except duckdb.Error as exc:
            raise InputError(f"{self.path}: cannot be read: {_first_line(exc)}") from None


class FileBilling:
    """Metered rows and invoice lines from two files in the canonical shapes."""

    def __init__(self, metered: str | Path | None, invoiced: str | Path | None) -> None:
        self.metered_file = _in_file_order(metered) if metered else None
        self.invoiced_file = _in_file_order(invoiced) if invoiced else None

    def fingerprint(self) -> str:
        parts = [f.fingerprint() for f in (self.metered_file, self.invoiced_file) if f]
        return ",".join(parts)

    def columns(self) -> tuple[Columns, Columns] | None:
        """The metered rows and the invoice lines as `Columns`; None when a file is not named or a
        value is doubtful (`metered()` and `invoiced()` then read it field by field, naming a bad one)."""
        if self.metered_file is None or self.invoiced_file is None:
            return None
        self.metered_file.require(METERED_COLUMNS)
        self.invoiced_file.require(INVOICED_COLUMNS)
        metered = _read_columns(self.metered_file, _METERED_READERS)
        invoiced = _read_columns(self.invoiced_file, _INVOICED_READERS) if metered is not None else None
        return None if metered is None or invoiced is None else (metered, invoiced)

    def metered(self) -> Iterator[MeteredRecord]:
        if self.metered_file is None:
            return
        table = self.metered_file
        table.require(METERED_COLUMNS)
        columns = _read_columns(table, _METERED_READERS)
        if columns is not None:
            yield from columns.records(MeteredRecord)
            return
        field = _FieldReader(table)
        for index, row in table.text_rows(METERED_COLUMNS):
            values = dict(zip(METERED_COLUMNS, row, strict=True))
            yield MeteredRecord(
                customer_id=field.text(values, "customer_id", index, allow_empty=True),
                meter=field.text(values, "meter", index),
                period_start=field.instant(values, "period_start", index),
                period_end=field.instant(values, "period_end", index),
                quantity=field.decimal(values, "quantity", index),
            )

    def invoiced(self) -> Iterator[InvoiceLine]:
        if self.invoiced_file is None:
            return
        table = self.invoiced_file
        table.require(INVOICED_COLUMNS)
        columns = _read_columns(table, _INVOICED_READERS)
        if columns is not None:
            yield from columns.records(InvoiceLine)
            return
        field = _FieldReader(table)
        for index, row in table.text_rows(INVOICED_COLUMNS):
            values = dict(zip(INVOICED_COLUMNS, row, strict=True))
            kind = field.text(values, "kind", index)
            if kind not in KINDS:
                raise InputError(
                    f"{table.path}: {table.where(index)}: kind: must be one of {', '.join(KINDS)} (got {kind!r})"
                )
            yield InvoiceLine(
                invoice_id=field.text(values, "invoice_id", index),
                line_id=field.text(values, "line_id", index),
                customer_id=field.text(values, "customer_id", index, allow_empty=True),
                meter=field.text(values, "meter", index, allow_empty=True),
                period_start=field.instant(values, "period_start", index),
                period_end=field.instant(values, "period_end", index),
                quantity=field.decimal(values, "quantity", index),
                amount=field.decimal(values, "amount", index),
                currency=field.text(values, "currency", index).lower(),
                kind=kind,
            )


def _in_file_order(path: str | Path) -> TableFile:
    """A file whose rows are read in file order: the row index names a bad row's line."""
    con = connect()
    con.execute("SET preserve_insertion_order = true")
    return TableFile(path, con)


class _Unsure(Exception):
    """A value the quick reading does not accept; the field-by-field reading decides."""


# A column's reader: the parser of each of its distinct values, or None for an id column
# (non-empty texts, trimmed, nearly all distinct).
_Reader = Callable[[str | None], Any] | None


@dataclass(frozen=True)
class Columns:
    """A billing file's rows column by column, every value parsed as the records' fields are.

    A column of repeating values (names, instants, numbers) holds each distinct value parsed
    once (`distinct`) and each row's index into them; an id column holds each row's text.
    A run reads the rows as records (`records`), or joins them by key in DuckDB and makes
    records of the few rows it needs (`bot.bulk`)."""

    names: tuple[str, ...]  # the record's fields, in its order
    distinct: dict[str, list[Any]]
    rows: pa.Table  # per row: an int32 index into `distinct[column]`, or the id's text

    def __len__(self) -> int:
        return self.rows.num_rows

    def values(self, column: str, rows: pa.Array | None = None) -> list[Any]:
        """The column's parsed values, of every row or of `rows` (indices)."""
        cells = self.rows.column(column)
        if rows is not None:
            cells = cells.take(rows)
        if column not in self.distinct:
            return cells.to_pylist()
        return list(map(self.distinct[column].__getitem__, cells.to_pylist()))

    def spans(self) -> list[tuple[int, int]]:
        """The distinct (period_start, period_end) of the rows, as indices into `distinct`."""
        found = self.rows.select(["period_start", "period_end"]).group_by(["period_start", "period_end"])
        pairs = found.aggregate([]).to_pydict()
        return list(zip(pairs["period_start"], pairs["period_end"], strict=True))

    def texts(self, column: str) -> pa.Array:
        """A text column's parsed value on every row, for a query."""
        import pyarrow as pa

        return pa.array(self.distinct[column], pa.string()).take(self.rows.column(column).combine_chunks())

    def records(self, make: Callable[..., Any], rows: pa.Array | None = None) -> list[Any]:
        """`make(*fields)` of every row, or of `rows`."""
        return list(map(make, *(self.values(column, rows) for column in self.names)))


def _read_columns(table: TableFile, fields: dict[str, _Reader]) -> Columns | None:
    """The file's rows as `Columns` (`fields`: each column and its reader, in the record's
    order); None at the first doubtful value, so that the field-by-field reading below names
    its file, line and field."""
    import pyarrow as pa

    names = tuple(fields)
    select = ", ".join(f"CAST({_ident(c)} AS VARCHAR)" for c in names)
    try:
        result = table.con.sql(f"SELECT {select} FROM {table.relation(names)}").to_arrow_table()
    except duckdb.Error as exc:
        raise InputError(f"{table.path}: cannot be read: {_first_line(exc)}") from None
    distinct: dict[str, list[Any]] = {}
    rows: dict[str, pa.Array] = {}
    try:
        for index, (name, read) in enumerate(fields.items()):
            cells = result.column(index)
            if read is None:
                rows[name] = pa.array(_ids(cells), pa.string())
                continue
            distinct[name], rows[name] = _each_distinct(read, cells)
    except _Unsure:
        return None
    return Columns(names, distinct, pa.table(rows))


def _each_distinct(read: Callable[[str | None], Any], cells: pa.ChunkedArray) -> tuple[list[Any], pa.Array]:
    """Each distinct value of `cells` read once, and each row's index into them: customers,
    meters, instants and amounts repeat from row to row, and the rows share one object for each."""
    encoded = cells.combine_chunks().dictionary_encode(null_encoding="encode")
    return [read(value) for value in encoded.dictionary.to_pylist()], encoded.indices


def _ids(values: pa.ChunkedArray) -> list[str]:
    """Non-empty texts, trimmed: invoice and line ids, nearly all distinct."""
    try:
        texts = list(map(str.strip, values.to_pylist()))
    except TypeError:  # a null
        raise _Unsure from None
    if not all(texts):
        raise _Unsure
    return texts


def _required(value: str | None) -> str:
    text = (value or "").strip()
    if not text:
        raise _Unsure
    return text


def _number(value: str | None) -> Decimal:
    number = parse_decimal(value) if value else None
    if number is None:
        raise _Unsure
    return number


def _instant(value: str | None) -> datetime:
    text = (value or "").strip()
    moment = parse_instant(text) if text else None
    if moment is None:
        raise _Unsure
    return moment


# Names that repeat across records (customer, meter, currency, kind) are interned: one
# string per name instead of one per record.


def _name(value: str | None) -> str:
    return intern((value or "").strip())


def _required_name(value: str | None) -> str:
    return intern(_required(value))


def _currency(value: str | None) -> str:
    return intern(_required(value).lower())


def _kind(value: str | None) -> str:
    kind = _required(value)
    if kind not in KINDS:
        raise _Unsure
    return intern(kind)


_METERED_READERS: dict[str, _Reader] = {
    "customer_id": _name,
    "meter": _required_name,
    "period_start": _instant,
    "period_end": _instant,
    "quantity": _number,
}
_INVOICED_READERS: dict[str, _Reader] = {
    "invoice_id": None,
    "line_id": None,
    "customer_id": _name,
    "meter": _name,
    "period_start": _instant,
    "period_end": _instant,
    "quantity": _number,
    "amount": _number,
    "currency": _currency,
    "kind": _kind,
}


class _FieldReader:
    """Parses one field of one row, or raises an error naming file, line and field."""

    def __init__(self, table: TableFile) -> None:
        self.table = table
        self._instants: dict[str, datetime | None] = {}

    def fail(self, index: int, column: str, problem: str) -> InputError:
        return InputError(f"{self.table.path}: {self.table.where(index)}: {column}: {problem}")

    def text(self, values: dict[str, Any], column: str, index: int, allow_empty: bool = False) -> str:
        value = (values[column] or "").strip()
        if not value and not allow_empty:
            raise self.fail(index, column, "is empty")
        return value

    def instant(self, values: dict[str, Any], column: str, index: int) -> datetime:
        text = self.text(values, column, index)
        if text not in self._instants:
            self._instants[text] = parse_instant(text)
        moment = self._instants[text]
        if moment is None:
            raise self.fail(index, column, f"not an ISO-8601 timestamp or Unix seconds ({text!r})")
        return moment

    def decimal(self, values: dict[str, Any], column: str, index: int) -> Decimal:
        text = self.text(values, column, index)
        number = parse_decimal(text)
        if number is None:
            raise self.fail(index, column, f"not a decimal number ({text!r})")
        return number


class RawEventsFile:
    """Raw usage events in a file, aggregated on a run's timeline by DuckDB."""

    def __init__(self, path: str | Path, memory_limit: str = "1GB") -> None:
        self.table = TableFile(path, connect(memory_limit))

    def fingerprint(self) -> str:
        return self.table.fingerprint()

    def aggregate(
        self,
        timeline: Timeline,
        evidence_limit: int,
        zone: str = "UTC",
        progress: Callable[[duckdb.DuckDBPyConnection], Any] | None = None,
        customers: frozenset[str] = frozenset(),
    ) -> list[RawAggregate]:
        """Aggregates on the timeline; with `customers`, only their events are read."""
        return raw_aggregates(self.aggregate_table(timeline, evidence_limit, zone, progress, customers))

    def aggregate_table(
        self,
        timeline: Timeline,
        evidence_limit: int,
        zone: str = "UTC",
        progress: Callable[[duckdb.DuckDBPyConnection], Any] | None = None,
        customers: frozenset[str] = frozenset(),
    ) -> pa.Table:
        """`aggregate`'s rows as the Arrow table the query hands back: RawAggregate's fields,
        in its order, the quantity as text (`bot.bulk` keeps most rows out of Python)."""
        types = self.table.require(RAW_COLUMNS, ("received_at",))
        relation = self.table.relation(RAW_FIELDS)
        if customers:
            relation = f"(SELECT * FROM {relation} WHERE list_contains($customers, CAST(customer_id AS VARCHAR)))"
        sql = aggregate_sql(relation, types, timeline, evidence_limit, zone)
        con = self.table.con
        try:
            with _Watch(con, progress):
                params = {"customers": sorted(customers)} if customers else None
                result = con.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as exc:
            raise InputError(f"{self.table.path}: cannot be read: {_first_line(exc)}") from None
        if any(result.column("has_bad").to_pylist()):
            raise self._first_bad_row(types)
        return result.drop_columns(["has_bad"])

    def _first_bad_row(self, types: dict[str, str]) -> InputError:
        """Find the first bad row in file order (only on the failure path)."""
        columns = _event_columns(types)
        checks = _row_checks(columns)
        bad = " ".join(f"WHEN {test} THEN '{name}'" for name, test in checks)
        shown = " ".join(f"WHEN '{name}' THEN {_TEXT_OF[name]}" for name, _ in checks)
        pattern = self.table.pattern
        relation = self.table.relation(RAW_FIELDS, filename=pattern)
        source = "filename" if pattern else "NULL"
        sql = f"""
            SELECT file, n, bad, CASE bad {shown} END FROM (
                SELECT file, row_number() OVER (PARTITION BY file) - 1 AS n, CASE {bad} END AS bad, *
                FROM (SELECT {source} AS file, {_select_events(columns)} FROM {relation})
            ) WHERE bad IS NOT NULL ORDER BY file, n LIMIT 1"""
        self.table.con.execute("SET preserve_insertion_order = true")
        file, index, column, value = self.table.con.execute(sql).fetchone()  # type: ignore[misc]
        if value is None or not value.strip():
            problem = "is empty"
        elif column == "quantity":
            problem = f"not a decimal number ({value!r})"
        else:
            problem = f"not an ISO-8601 timestamp or Unix seconds ({value!r})"
        return InputError(f"{file or self.table.path}: {self.table.where(index)}: {column}: {problem}")


_TEXT_OF = {
    "event_id": "event_id",
    "customer_id": "customer_id",
    "meter": "meter",
    "timestamp": "timestamp_text",
    "quantity": "quantity_text",
    "received_at": "received_at_text",
}


def _event_columns(types: dict[str, str]) -> dict[str, str]:
    """The SQL expression of each parsed column, by the file's column type."""
    received = "received_at" in types
    return {
        "event_id": _trimmed("event_id"),
        "customer_id": _trimmed("customer_id"),
        "meter": _trimmed("meter"),
        "ts": _instant_sql("timestamp", types["timestamp"]),
        "rcv": _instant_sql("received_at", types["received_at"]) if received else "NULL::TIMESTAMPTZ",
        "qty": _decimal_sql("quantity", types["quantity"]),
        "timestamp_text": "CAST(timestamp AS VARCHAR)",
        "received_at_text": "CAST(received_at AS VARCHAR)" if received else "NULL::VARCHAR",
        "quantity_text": "CAST(quantity AS VARCHAR)",
    }


def _trimmed(column: str) -> str:
    """A text column trimmed, NULL when empty. trim() walks every character (it strips Unicode
    spaces), so it only runs on a value that starts or ends with a space or is not plain ASCII."""
    text = f"CAST({column} AS VARCHAR)"
    needs_trim = f"prefix({text}, ' ') OR suffix({text}, ' ') OR strlen({text}) <> length({text})"
    return f"NULLIF(CASE WHEN {needs_trim} THEN trim({text}) ELSE {text} END, '')"


def _select_events(columns: dict[str, str]) -> str:
    return ", ".join(f"{expr} AS {_ident(name)}" for name, expr in columns.items())


def _row_checks(columns: dict[str, str]) -> list[tuple[str, str]]:
    return [
        ("event_id", "event_id IS NULL"),
        ("customer_id", "customer_id IS NULL"),
        ("meter", "meter IS NULL"),
        ("timestamp", "ts IS NULL"),
        ("quantity", "qty IS NULL"),
        # A CASE: trim() only where the instant is missing (an AND would trim every row)
        ("received_at", "CASE WHEN rcv IS NULL THEN NULLIF(trim(received_at_text), '') IS NOT NULL ELSE false END"),
    ]


# The sums of a group of rows whose event id is unique.
_SUMS = """sum(qty) AS quantity,
            count(*) AS events,
            list(event_id) FILTER (WHERE receiving IS NOT NULL) AS late_ids,
            list(origin) FILTER (WHERE origin IS NOT NULL) AS origins"""
# The keys that aggregate_sql trims per group, after the sums, rather than row by row.
_KEY_NAMES = ("customer_id", "meter")


def aggregate_sql(relation: str, types: dict[str, str], timeline: Timeline, evidence_limit: int, zone: str) -> str:
    """One query: validate, deduplicate by event_id, bucket on the timeline, sum."""
    # customer_id and meter are grouped as written and trimmed per group, after the sums: the
    # test of whether to trim cost some 6% of the query row by row, and a file repeats each key
    # over many rows. Their blank values (bad rows) are found there too: per group, per copy.
    columns = {**_event_columns(types), **{name: f"CAST({_ident(name)} AS VARCHAR)" for name in _KEY_NAMES}}
    bad = " OR ".join(test for name, test in _row_checks(columns) if name not in _KEY_NAMES)
    start, end = _ts(timeline.start), _ts(timeline.end)
    first_window, last_window = _ts(timeline.start + timeline.grace), _ts(timeline.end + timeline.grace)
    period = _bucket("ts", [p.end for p in timeline.periods], timeline.start)
    segment = _bucket("ts", [s.end for s in timeline.segments], timeline.start)
    window = _window("rcv", timeline)
    limit = max(evidence_limit, 0)
    key = ("customer_id", "meter", "segment_no", "receiving")
    customer, meter = _trimmed("customer_id"), _trimmed("meter")
    # The file is read twice: once for the hashes of the event ids seen more than once, then for
    # everything else. A hash collision only sends a row down the path of the copies, where rows
    # are told apart by their exact id, so the result does not depend on it.
    return f"""
    WITH dup_hashes AS MATERIALIZED (
        -- Sorting the hashes finds the repeated ones for less than a GROUP BY of ten million.
        SELECT DISTINCT h FROM (SELECT hash({_trimmed("event_id")}) AS h FROM {relation})
        QUALIFY h = lag(h) OVER (ORDER BY h)
    ),
    events AS (
        -- Each row parsed once (before the join, which would turn Parquet's dictionary-encoded
        -- columns into plain ones); `is_copy` when its id's hash is among those above.
        SELECT e.*, dup_hashes.h IS NOT NULL AND NOT e.bad AS is_copy
        FROM (SELECT *, {bad} AS bad FROM (SELECT {_select_events(columns)} FROM {relation})) AS e
        LEFT JOIN dup_hashes ON hash(e.event_id) = dup_hashes.h
    ),
    placed AS (
        -- Bad rows fall in segment -3, which stops the run. Rows outside the run (neither in
        -- its periods nor late for its first one) fall in segment -2, dropped after the sums: a
        -- WHERE here would be pushed down and parse every row a second time.
        SELECT *, {period} AS period_no,
            CASE WHEN bad THEN -3 WHEN keep THEN {segment} ELSE -2 END AS segment_no,
            {window} AS window_no
        FROM (
            SELECT *, ((ts >= {start} AND ts < {end})
                OR (ts < {start} AND rcv > {first_window} AND rcv <= {last_window})) AS keep
            FROM events
        )
    ),
    flagged AS (
        SELECT *, CASE WHEN window_no > period_no THEN window_no END AS receiving,
            -- the month of an event before the run, late into it (a CASE: only those are formatted)
            CASE WHEN segment_no = -1 THEN strftime(timezone({_quote_literal(zone)}, ts), '%Y-%m') END AS origin
        FROM placed
    ),
    groups AS MATERIALIZED (
        -- One pass over the rows: those with a unique id are summed by key. A copy is keyed by
        -- `copy_key` as well, its instants, quantity and id in one text, so its group holds only
        -- copies equal to it, which come back one by one below (a list of each group's copies
        -- cost some 8% of the query: every row was packed for it). The id goes last, after
        -- three fields without commas, as it may hold any character. The keys are trimmed here,
        -- after the sums. `events > 0` (always true) keeps the optimizer from moving the tests
        -- on these columns below the GROUP BY, where they would run on every row.
        SELECT * EXCLUDE (copy_key), CASE WHEN events > 0 THEN copy_key END AS copy_key,
            CASE WHEN events > 0 THEN {customer} END AS trimmed_customer,
            CASE WHEN events > 0 THEN {meter} END AS trimmed_meter
        FROM (
            SELECT {", ".join(key)},
                CASE WHEN is_copy THEN concat(ts, ',', rcv, ',', qty, ',', event_id) END AS copy_key,
                {_SUMS}
            FROM flagged
            GROUP BY ALL
        )
    ),
    copies AS (
        -- Each copy back as a row, as many times as its group counted it.
        SELECT trimmed_customer AS customer_id, trimmed_meter AS meter, segment_no, receiving,
            CAST(f.ts AS TIMESTAMPTZ) AS ts, CAST(NULLIF(f.rcv, '') AS TIMESTAMPTZ) AS rcv,
            CAST(f.qty AS {QUANTITY}) AS qty, f.id AS event_id
        FROM (
            SELECT *, regexp_extract(copy_key, '(?s)^([^,]*),([^,]*),([^,]*),(.*)$', ['ts', 'rcv', 'qty', 'id']) AS f,
                unnest(range(events))
            FROM groups WHERE copy_key IS NOT NULL
        )
    ),
    ranked AS (
        -- The copies of each id, first received first. Copies with a blank key are bad,
        -- ranked apart: one at least comes out.
        SELECT *,
            CASE WHEN segment_no = -1 THEN strftime(timezone({_quote_literal(zone)}, ts), '%Y-%m') END AS origin,
            row_number() OVER (same_id ORDER BY coalesce(rcv, ts), qty, customer_id, meter, ts) AS copy,
            count(*) OVER same_id AS copies,
            min(qty) OVER same_id <> max(qty) OVER same_id AS conflict
        FROM copies
        WINDOW same_id AS (PARTITION BY event_id, customer_id IS NULL OR meter IS NULL)
    ),
    plain AS (
        -- The groups of the rows whose event id is unique.
        SELECT * FROM groups WHERE copy_key IS NULL
    ),
    other_sums AS (
        -- The first received copy of each id counts, the others are counted and listed; with
        -- them, the groups whose keys were not as written (trimmed, they may now share their
        -- key with other groups): summed by key.
        SELECT {", ".join(key)}, sum(quantity) AS quantity, sum(events) AS events,
            flatten(list(late_ids) FILTER (WHERE late_ids IS NOT NULL)) AS late_ids,
            list(dup_id) FILTER (WHERE dup_id IS NOT NULL) AS dup_ids,
            sum(dropped) AS dropped_copies,
            count(*) FILTER (WHERE conflict) AS conflicts,
            flatten(list(origins) FILTER (WHERE origins IS NOT NULL)) AS origins
        FROM (
            SELECT {", ".join(key)}, qty AS quantity, 1 AS events,
                CASE WHEN receiving IS NOT NULL THEN [event_id] END AS late_ids,
                CASE WHEN origin IS NOT NULL THEN [origin] END AS origins,
                CASE WHEN copies > 1 THEN event_id END AS dup_id, copies - 1 AS dropped, conflict
            FROM ranked WHERE copy = 1
            UNION ALL
            SELECT trimmed_customer, trimmed_meter, segment_no, receiving, quantity, events,
                late_ids, origins, NULL, 0, false
            FROM plain
            WHERE trimmed_customer IS DISTINCT FROM customer_id OR trimmed_meter IS DISTINCT FROM meter
        )
        GROUP BY ALL
    ),
    sums AS (
        -- Each key's sums of unique rows and of first copies, added up.
        SELECT
            {", ".join(f"coalesce(u.{k}, c.{k}) AS {k}" for k in key)},
            CASE WHEN c.quantity IS NULL THEN u.quantity WHEN u.quantity IS NULL THEN c.quantity
                ELSE u.quantity + c.quantity END AS quantity,
            coalesce(u.events, 0) + coalesce(c.events, 0) AS events,
            CASE WHEN c.late_ids IS NULL THEN u.late_ids ELSE list_concat(u.late_ids, c.late_ids) END AS late_ids,
            c.dup_ids,
            coalesce(c.dropped_copies, 0) AS dropped_copies,
            coalesce(c.conflicts, 0) AS conflicts,
            CASE WHEN c.origins IS NULL THEN u.origins ELSE list_concat(u.origins, c.origins) END AS origins
        FROM (
            SELECT * FROM plain
            WHERE trimmed_customer IS NOT DISTINCT FROM customer_id AND trimmed_meter IS NOT DISTINCT FROM meter
        ) AS u
        FULL JOIN other_sums AS c ON u.customer_id = c.customer_id AND u.meter = c.meter
            AND u.segment_no = c.segment_no AND u.receiving IS NOT DISTINCT FROM c.receiving
    )
    -- The fields of RawAggregate, in its order, and whether a row was bad (or a key blank).
    SELECT
        customer_id, meter, CASE WHEN segment_no >= 0 THEN segment_no END AS segment, receiving,
        quantity::VARCHAR AS quantity, events::BIGINT AS events,
        list_slice(list_sort(late_ids), 1, {limit}) AS late_event_ids,
        list_slice(list_sort(dup_ids), 1, {limit}) AS duplicate_event_ids,
        dropped_copies::BIGINT AS dropped_copies, conflicts AS conflicting_copies,
        list_sort(list_distinct(origins)) AS origin_periods,
        segment_no = -3 OR customer_id IS NULL OR meter IS NULL AS has_bad
    FROM sums
    WHERE segment_no IS DISTINCT FROM -2 OR customer_id IS NULL OR meter IS NULL
    ORDER BY {", ".join(key)}  -- the report's order, so sorting it is cheap
    """


def raw_aggregates(result: pa.Table) -> list[RawAggregate]:
    """The query's rows as records, built column by column (most rows list no ids, no months)."""

    def parsed(read: Callable[[str | None], Any], name: str) -> list[Any]:
        distinct, indices = _each_distinct(read, result.column(name))
        return list(map(distinct.__getitem__, indices.to_pylist()))

    def values(name: str) -> list[Any]:
        return result.column(name).to_pylist()

    def tuples(name: str) -> list[tuple[str, ...]]:
        return [tuple(items) if items else () for items in values(name)]

    return list(
        map(
            RawAggregate,  # the fields in order
            parsed(intern, "customer_id"),
            parsed(intern, "meter"),
            values("segment"),
            values("receiving"),
            parsed(aggregate_quantity, "quantity"),
            values("events"),
            tuples("late_event_ids"),
            tuples("duplicate_event_ids"),
            values("dropped_copies"),
            values("conflicting_copies"),
            tuples("origin_periods"),
        )
    )


def aggregates_table(aggregates: Iterable[RawAggregate | tuple[Any, ...]]) -> pa.Table:
    """`raw_aggregates`' inverse: the records as the Arrow table `RawEventsFile.aggregate_table`
    gives, for a source that makes records (the quantity's text reads back as the same
    Decimal when it is normalized, as every source's is). A tuple stands for a record of its
    first fields, the others empty."""
    import pyarrow as pa

    ids = pa.list_(pa.field("l", pa.string()))
    schema = pa.schema(
        [
            ("customer_id", pa.string()),
            ("meter", pa.string()),
            ("segment", pa.int32()),
            ("receiving", pa.int32()),
            ("quantity", pa.string()),
            ("events", pa.int64()),
            ("late_event_ids", ids),
            ("duplicate_event_ids", ids),
            ("dropped_copies", pa.int64()),
            ("conflicting_copies", pa.int64()),
            ("origin_periods", ids),
        ]
    )
    fields = attrgetter(*schema.names)
    rows = [a if isinstance(a, tuple) else fields(a) for a in aggregates]
    # The first six fields from every row (a tuple's or a record's), taken in C; the others are
    # empty but for the few records, put in by position.
    columns: dict[str, list[Any]] = {name: list(map(itemgetter(i), rows)) for i, name in enumerate(schema.names[:6])}
    columns["quantity"] = list(map(str, columns["quantity"]))
    records = [i for i, row in enumerate(rows) if len(row) > 6]
    for i, (name, empty) in enumerate(zip(schema.names[6:], ((), (), 0, 0, ()), strict=True), start=6):
        column = columns[name] = [empty] * len(rows)
        for at in records:
            column[at] = rows[at][i]
    return pa.table(columns, schema=schema)


def aggregate_quantity(text: str | None) -> Decimal:
    return Decimal(text).normalize() if text is not None else Decimal(0)


def _bucket(column: str, ends: list[datetime], start: datetime) -> str:
    """-1 before `start`, then the index of the first end the value is below."""
    whens = " ".join(f"WHEN {column} < {_ts(end)} THEN {i}" for i, end in enumerate(ends))
    return f"CASE WHEN {column} < {_ts(start)} THEN -1 {whens} END"


def _window(column: str, timeline: Timeline) -> str:
    """The index of the billing window `(start + grace, end + grace]` holding `column`."""
    closes = timeline.window_ends()
    whens = " ".join(f"WHEN {column} <= {_ts(close)} THEN {i}" for i, close in enumerate(closes))
    first = _ts(timeline.start + timeline.grace)
    return f"CASE WHEN {column} IS NULL THEN NULL WHEN {column} <= {first} THEN -1 {whens} ELSE {len(closes)} END"


def _instant_sql(column: str, kind: str) -> str:
    name = _ident(column)
    kind = kind.upper()
    if kind.startswith("TIMESTAMP WITH TIME ZONE"):
        return name
    if kind.startswith("TIMESTAMP") or kind == "DATE":
        return f"CAST({name} AS TIMESTAMPTZ)"
    if kind in _NUMERIC:
        return f"CAST(make_timestamp(CAST({name} AS BIGINT) * 1000000) AS TIMESTAMPTZ)"
    text = f"trim(CAST({name} AS VARCHAR))"
    epoch = (
        f"CASE WHEN regexp_full_match({text}, '-?[0-9]+(\\.[0-9]{{1,6}})?') THEN CAST(make_timestamp("
        f"CAST(CAST({text} AS DECIMAL(38,6)) * 1000000 AS BIGINT)) AS TIMESTAMPTZ) END"
    )
    return _trim_if_needed(f"CAST({name} AS VARCHAR)", "TIMESTAMPTZ", epoch)


def _decimal_sql(column: str, kind: str) -> str:
    name = _ident(column)
    kind = kind.upper()
    if kind.startswith("DECIMAL") or kind in _NUMERIC:
        return f"CAST({name} AS {QUANTITY})"
    return _trim_if_needed(f"CAST({name} AS VARCHAR)", QUANTITY)


def _trim_if_needed(text: str, kind: str, fallback: str = "NULL") -> str:
    """TRY_CAST(trim(text) AS kind), else `fallback`. The cast skips ASCII white space itself, and
    whatever it reads untrimmed it reads the same trimmed, so trim() (slow: it strips Unicode spaces
    too) runs only where the plain cast fails. A CASE, not a coalesce(): the optimizer would hoist
    the trim() the fallbacks share out of a coalesce() and run it on every row; it leaves a CASE's
    branches alone (and computes the plain cast once)."""
    plain = f"TRY_CAST({text} AS {kind})"
    return f"CASE WHEN {plain} IS NULL THEN coalesce(TRY_CAST(trim({text}) AS {kind}), {fallback}) ELSE {plain} END"


class _Watch:
    """Runs `progress(con)` in a thread while a query executes."""

    def __init__(self, con: duckdb.DuckDBPyConnection, progress: Callable[..., Any] | None) -> None:
        self.con, self.progress = con, progress
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Watch:
        if self.progress is not None:
            self.thread = threading.Thread(target=self.progress, args=(self.con, self.done), daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()


def enable_remote(con: duckdb.DuckDBPyConnection, url: str, environ: Mapping[str, str] | None = None) -> None:
    """Let DuckDB read `url`: through its httpfs extension when that loads, given the standard
    AWS variables as an S3 secret; else, for `s3://`, through s3fs (an fsspec filesystem, the
    `s3` extra) registered on the connection; else through httpfs installed now (a download)."""
    environ = os.environ if environ is None else environ
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error:
        if S3FS_URL.match(url) and _register_s3fs(con, environ):
            return
        try:
            con.execute("INSTALL httpfs")
            con.execute("LOAD httpfs")
        except duckdb.Error as exc:
            raise InputError(
                f"{url}: DuckDB's httpfs extension is needed to read it and could not be installed "
                f"({_first_line(exc)}); run `INSTALL httpfs` in DuckDB on a machine that can download it"
                + (", or install s3fs (pip install 'overage-recon[s3]')" if S3FS_URL.match(url) else "")
            ) from None
    options = s3_secret(environ)
    if options:
        spec = ", ".join(f"{key} {_quote_literal(value)}" for key, value in options.items())
        con.execute(f"CREATE OR REPLACE SECRET recon_s3 (TYPE s3, {spec})")


S3FS_URL = re.compile(r"^s3a?://", re.IGNORECASE)


def _register_s3fs(con: duckdb.DuckDBPyConnection, environ: Mapping[str, str]) -> bool:
    """s3fs on the connection, with the same AWS variables as `s3_secret` (and, without keys,
    botocore's own chain: profile, instance role); False when s3fs is not installed. A fresh
    filesystem without a listing cache, so a long-running worker sees new objects."""
    try:
        import s3fs  # type: ignore[import-untyped]
    except ImportError:
        return False
    aws = _aws_variables(environ)
    options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
    options |= {name: aws[name] for name in ("key", "secret", "token") if name in aws}
    if "endpoint" in aws:
        options["endpoint_url"] = aws["endpoint"]
    if "region" in aws:
        options["client_kwargs"] = {"region_name": aws["region"]}
    con.register_filesystem(s3fs.S3FileSystem(**options))
    return True


def s3_secret(environ: Mapping[str, str]) -> dict[str, str]:
    """DuckDB's S3 secret options from the AWS variables (`_aws_variables`)."""
    aws = _aws_variables(environ)
    names = {"key": "KEY_ID", "secret": "SECRET", "token": "SESSION_TOKEN", "region": "REGION"}
    options = {option: aws[name] for name, option in names.items() if name in aws}
    if "endpoint" in aws:
        parts = urlsplit(aws["endpoint"])
        options["ENDPOINT"] = parts.netloc
        options["URL_STYLE"] = "path"
        options["USE_SSL"] = "true" if parts.scheme == "https" else "false"
    return options


def _aws_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The standard AWS variables that are set: AWS_ACCESS_KEY_ID (`key`), AWS_SECRET_ACCESS_KEY
    (`secret`), AWS_SESSION_TOKEN (`token`), AWS_REGION or AWS_DEFAULT_REGION (`region`), and
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (`endpoint`, an S3-compatible server; https:// when
    it names no scheme)."""
    found = {
        "key": environ.get("AWS_ACCESS_KEY_ID"),
        "secret": environ.get("AWS_SECRET_ACCESS_KEY"),
        "token": environ.get("AWS_SESSION_TOKEN"),
        "region": environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"),
        "endpoint": environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"),
    }
    if found["endpoint"] and "://" not in found["endpoint"]:
        found["endpoint"] = f"https://{found['endpoint']}"
    return {name: value for name, value in found.items() if value}


def _ts(moment: datetime) -> str:
    return f"TIMESTAMPTZ '{moment.isoformat()}'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(exc: Exception) -> str:
    """The message's first line; for an error DuckDB passes on from Python code (s3fs), which
    carries the traceback, its last line (the exception itself)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if any("Traceback (most recent call last)" in line for line in lines):
        return lines[-1].strip()
    return lines[0]
