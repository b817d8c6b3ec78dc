"""The only module that decides what is stored: runs, their lines, discrepancies, timing items, the inbox.

Every query is written here once, in SQL that SQLite and PostgreSQL both run; the
backends in `bot/database.py` run it (placeholders, connections, transactions, the
inbox claim and the other few differences; its docstring says how to add a query).
SQLite through sqlite-utils is the embedded default; `RECON_DATABASE_URL=postgresql://...`
keeps everything in PostgreSQL, through a psycopg connection pool, for several web and
worker processes on several machines.

A run is written in one transaction (no half-written run) and never changed afterwards;
its id comes from its inputs, so saving the same run again writes nothing. The schema is
versioned: `bot.migrations.MIGRATIONS` is the ordered list of steps, each run once, in order, in one
transaction with the version it reaches, when any process opens the store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import Any

from bot.database import Backend, DatabaseError, open_backend
from bot.migrations import MIGRATIONS
from bot.pages import LINES_PER_PAGE, PageKeys, compressed, unpack, unpack_keys, unpacked
from rules.report import StoredLine, StoredPage, StoredPages, pages_of, parse_line

INBOX_STATES = ("pending", "processing", "done", "ignored", "dead")
TABLES = (
    "runs",
    "run_pages",
    "run_customers",
    "discrepancies",
    "watchlist",
    "watch_checks",
    "inbox",
    "route_messages",
    "route_posting",
    "route_tickets",
    "route_decisions",
    "route_writebacks",
    "route_writing",
    "schema_version",
)


class StoreError(RuntimeError):
    """The database cannot be opened or used."""


@dataclass(frozen=True)
class RunRecord:
    """What identifies a run and how it was computed."""

    run_id: str
    period_start: str
    period_end: str
    period_label: str
    config_hash: str
    calculation_version: str
    inputs: dict[str, str]
    customers: list[str]
    invoice_id: str | None = None
    customer_id: str | None = None


def now() -> str:
    return stamp(datetime.now(UTC))


def stamp(moment: datetime) -> str:
    """A UTC instant as fixed-width text, so that text order is time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Claimed:
    """An inbox event a worker holds under a lease."""

    provider: str
    event_id: str
    type: str
    account: str | None
    body: str
    attempts: int


# The runs that may hold lines of a period (parameters: its label, then '%..%'). A run's lines
# are all of its own periods (bot.service.save labels a run of one period by it, of several
# `first..last`), so a run of one other period holds none; a custom period's label has `..` too.
_RUNS_OF_PERIOD = "(period_label = ? OR period_label LIKE ?)"

MONTH_LABEL = re.compile(r"\d{4}-\d{2}")


def _like_prefix(text: str) -> str:
    """`text` as a LIKE pattern matching itself only (with ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


RUN_COLUMNS = (
    "run_id, status, created_at, period_start, period_end, period_label, config_hash, calculation_version, "
    "inputs, customers, invoice_id, customer_id, summary"
)


class Store:
    lines_per_page = LINES_PER_PAGE  # a run's line texts are kept in compressed pages of this many (bot.pages)

    def __init__(self, backend: Backend, url: str = "sqlite:///:memory:") -> None:
        self.backend = backend
        self.url = url

    @classmethod
    def open(cls, url: str) -> Store:
        """Open (and migrate) the database at `url`: `sqlite:///path` or `postgresql://...`."""
        try:
            store = cls(open_backend(url), url)
        except DatabaseError as exc:
            raise StoreError(str(exc)) from None
        store.migrate()
        return store

    def close(self) -> None:
        self.backend.close()

    def sibling(self) -> Store:
        """A store another thread may use at the same time (SQLite: a second connection)."""
        backend = self.backend.sibling()
        return self if backend is self.backend else Store(backend, self.url)

    @property
    def dialect(self) -> str:
        return self.backend.dialect

    # -- schema -----------------------------------------------------------------

    def migrate(self) -> int:
        """Bring the schema forward to `bot.migrations.SCHEMA_VERSION`; returns the version found.

        Processes that start together take turns (a lock held for the whole migration);
        the one that comes second finds the schema current and changes nothing."""
        with self.backend.migration_lock():
            found = self.schema_version() if self.backend.has_table("schema_version") else 0
            for version, step in enumerate(MIGRATIONS[found:], start=found + 1):
                step(self.backend)
                self.backend.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", [version, now()])
        return found

    def schema_version(self) -> int:
        row = self.backend.one("SELECT max(version) FROM schema_version")
        return int(row[0] or 0) if row else 0

    def count(self, table: str) -> int:
        """Rows in one of the store's tables (for checks and the CLI)."""
        if table not in TABLES:
            raise StoreError(f"no table {table!r} in the store")
        return int(self.backend.one(f"SELECT count(*) FROM {table}")[0])  # type: ignore[index]

    # -- runs -------------------------------------------------------------------

    def save_run(
        self,
        record: RunRecord,
        summary: dict[str, Any],
        lines: Iterable[StoredLine] | StoredPages,
        seen: Callable[[bytes], object] | None = None,
    ) -> bool:
        """Store a finished run with its lines and discrepancies; False if it was already done.

        A run started earlier (`start_run`) and cut short is completed under the same id.
        `lines` come one at a time, or a page at a time (`StoredPages`). `seen` is handed the
        stored line texts a page at a time (joined by newlines, in UTF-8), in order, as they
        are stored; only a call that returns True has handed it every page (a run done already
        hands it none, one that another process finishes first may hand it some).
        """
        if self.run_status(record.run_id) == "done":
            return False
        try:
            return self._insert_run(record, summary, lines, seen)
        except self.backend.integrity_error:
            if self.run_status(record.run_id) == "done":
                return False  # another process finished the same run first
            raise

    def start_run(self, record: RunRecord) -> str:
        """Record that a run is under way (status `running`); returns the run's status."""
        self.backend.execute(
            f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL) "
            "ON CONFLICT (run_id) DO NOTHING",
            [record.run_id, now(), *_run_values(record)],
        )
        return self.run_status(record.run_id) or "running"

    def run_status(self, run_id: str) -> str | None:
        row = self.backend.one("SELECT status FROM runs WHERE run_id = ?", [run_id])
        return row[0] if row else None

    def _insert_run(
        self,
        record: RunRecord,
        summary: dict[str, Any],
        lines: Iterable[StoredLine] | StoredPages,
        seen: Callable[[bytes], object] | None,
    ) -> bool:
        summary_text = json.dumps(summary, sort_keys=True)
        with self.backend.transaction():
            if self.run_status(record.run_id) is not None:
                # Only a run not yet done is completed; a process that finished it meanwhile wins
                # (on PostgreSQL this UPDATE waits for its commit, then finds it done).
                changed = self.backend.execute(
                    """UPDATE runs SET status = 'done', period_start = ?, period_end = ?, period_label = ?,
                           config_hash = ?, calculation_version = ?, inputs = ?, customers = ?, invoice_id = ?,
                           customer_id = ?, summary = ?
                       WHERE run_id = ? AND status <> 'done'""",
                    [*_run_values(record), summary_text, record.run_id],
                )
                if not changed:
                    return False
                self.backend.execute("DELETE FROM run_customers WHERE run_id = ?", [record.run_id])
                self.backend.execute("DELETE FROM run_pages WHERE run_id = ?", [record.run_id])
            else:
                self.backend.execute(
                    f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (?, 'done', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [record.run_id, now(), *_run_values(record), summary_text],
                )
            self._insert_lines(record.run_id, lines, seen)
        return True

    def _insert_lines(
        self, run_id: str, lines: Iterable[StoredLine] | StoredPages, seen: Callable[[bytes], object] | None = None
    ) -> None:
        """The run's lines in one pass (they may be made as they are taken): their texts and
        keys in compressed pages (run_pages), where each customer's lines start in run_customers
        (the index the lookups by key and by customer use), then the run's discrepancies and
        timing items, in the order of the lines."""
        breaks: list[dict[str, Any]] = []
        timing: list[dict[str, Any]] = []
        bodies: list[tuple[str, int, int, bytes, bytes]] = []
        pages = lines.pages if isinstance(lines, StoredPages) else pages_of(lines, self.lines_per_page)

        def read(page: StoredPage) -> StoredPage:
            if seen is not None:
                seen(page.data)
            for text in page.followed:  # a discrepancy, a timing item, or a line clearing one: read it
                shown = parse_line(text)
                if shown["class"] != "match":
                    breaks.append(shown)
                if shown["class"] == "timing" or shown["evidence"]["clears"]:
                    timing.append(shown)
            return page

        def spans() -> Iterator[tuple[str, int, str, int]]:
            # Each run of consecutive lines of one customer (a page may end inside one). The pages
            # are made and compressed as the database inserts the spans given so far
            # (Backend.insert_many).
            position, customer, first = 0, None, 0
            for page, body, keys in compressed(map(read, pages)):
                bodies.append((run_id, position, len(page.classes) - page.classes.count("match"), body, keys))
                for name, same in groupby(page.customers):
                    if name != customer:
                        if customer is not None:
                            yield run_id, first, customer, position - first
                        customer, first = name, position
                    position += sum(1 for _ in same)
            if customer is not None:
                yield run_id, first, customer, position - first

        self.backend.insert_many("run_customers", ("run_id", "first_position", "customer_id", "lines"), spans())
        self.backend.executemany(
            "INSERT INTO run_pages (run_id, first_position, breaks, body, keys) VALUES (?, ?, ?, ?, ?)", bodies
        )
        self._record_discrepancies(run_id, breaks)
        self._watch(run_id, timing)

    def _record_discrepancies(self, run_id: str, lines: list[dict[str, Any]]) -> None:
        rows = [
            (
                ln["customer_id"],
                ln["meter"],
                ln["period"],
                ln["class"],
                run_id,
                run_id,
                ln["delta_amount"],
                ln["currency"],
                ln["break_at"],
                ln["cause"],
            )
            for ln in lines
            if ln["class"] != "match"
        ]
        if not rows:
            return
        self.backend.executemany(
            """INSERT INTO discrepancies (customer_id, meter, period, class, first_run_id, last_run_id,
                   delta_amount, currency, break_at, cause)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (customer_id, meter, period, class) DO UPDATE SET
                   last_run_id = excluded.last_run_id, delta_amount = excluded.delta_amount,
                   break_at = excluded.break_at, cause = excluded.cause""",
            rows,
        )

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run's report in the contract's shape, or None."""
        head = self.run_head(run_id)
        if head is None:
            return None
        return {**head, "lines": [parse_line(text) for text in self.line_texts(run_id)]}

    def run_head(self, run_id: str) -> dict[str, Any] | None:
        """The run's report without its lines (`line_texts` gives them), or None."""
        rows = self.backend.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if not rows:
            return None
        run = rows[0]
        return {
            "run_id": run_id,
            "status": run["status"],
            "period": {"start": run["period_start"], "end": run["period_end"], "label": run["period_label"]},
            "summary": json.loads(run["summary"]) if run["summary"] else None,
        }

    def line_texts(self, run_id: str, breaks_only: bool = False) -> Iterator[str]:
        """The run's lines as stored (compact JSON), in order, a few pages at a time: a run of
        500,000 keys is never held whole. `breaks_only`: the lines that are not matches (only
        the pages holding one are read)."""
        if not breaks_only:
            for block in self.line_blocks(run_id):
                yield from block.split("\n")
            return
        for _, body, keys in self._pages(run_id, "body, keys", breaks_only=True):
            classes = unpack_keys(keys).classes
            yield from (text for text, klass in zip(unpack(body), classes, strict=True) if klass != "match")

    def line_blocks(self, run_id: str) -> Iterator[str]:
        """The run's lines as stored, in blocks of consecutive lines joined by newlines (a page
        each): a writer can handle a block at a time instead of a line."""
        return unpacked(body for _, body in self._pages(run_id, "body"))

    def _pages(self, run_id: str, columns: str, breaks_only: bool = False, batch: int = 8) -> Iterator[tuple[Any, ...]]:
        """Each of a run's pages as (first_position, *columns), in order, `batch` at a time;
        `breaks_only`: the pages holding a line that is not a match. `columns` are the store's
        own names."""
        where = "AND breaks > 0" if breaks_only else ""
        after = -1
        while True:
            rows = self.backend.tuples(
                f"""SELECT first_position, {columns} FROM run_pages WHERE run_id = ? AND first_position > ? {where}
                    ORDER BY first_position LIMIT ?""",
                [run_id, after, batch],
            )
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1][0]

    def _texts_at(self, run_id: str, positions: Iterable[int]) -> Iterator[str]:
        """The texts of a run's lines at `positions` (ascending), each page read once."""
        first, page = 0, []
        for position in positions:
            if not first <= position < first + len(page):
                row = self.backend.one(
                    """SELECT first_position, body FROM run_pages WHERE run_id = ? AND first_position <= ?
                       ORDER BY first_position DESC LIMIT 1""",
                    [run_id, position],
                )
                if row is None:
                    raise StoreError(f"run {run_id}: no stored page holds line {position}")
                first, page = row[0], unpack(row[1])
            yield page[position - first]

    def _line_at(self, run_id: str, position: int) -> dict[str, Any]:
        return parse_line(next(self._texts_at(run_id, [position])))

    def _customer_lines(
        self, run_id: str, customer_id: str, cache: dict[tuple[str, int], PageKeys] | None = None
    ) -> Iterator[tuple[int, str, str, str]]:
        """(position, meter, period, class) of each of a customer's lines in a run, in order:
        where they start (run_customers), then the keys of the pages holding them (kept in
        `cache`, by run and first position, for a caller looking up many keys)."""
        spans = self.backend.tuples(
            """SELECT first_position, lines FROM run_customers WHERE run_id = ? AND customer_id = ?
               ORDER BY first_position""",
            [run_id, customer_id],
        )
        cache = {} if cache is None else cache
        for first, count in spans:
            row = self.backend.one(
                "SELECT max(first_position) FROM run_pages WHERE run_id = ? AND first_position <= ?", [run_id, first]
            )
            page_first = row[0] if row else None
            while page_first is not None and page_first < first + count:  # pages are consecutive
                keys = cache.get((run_id, page_first)) or self._page_keys(run_id, page_first)
                cache[(run_id, page_first)] = keys
                yield from keys.find(page_first, first, first + count)
                page_first = page_first + len(keys.classes) if keys.classes else None

    def _page_keys(self, run_id: str, first_position: int) -> PageKeys:
        row = self.backend.one(
            "SELECT keys FROM run_pages WHERE run_id = ? AND first_position = ?", [run_id, first_position]
        )
        if row is None:
            raise StoreError(f"run {run_id}: no stored page starts at line {first_position}")
        return unpack_keys(row[0])

    def _position_of(self, run_id: str, customer_id: str, meter: str, period: str) -> int | None:
        """Where a key's line stands in a run, if the run has one."""
        found = (pos for pos, m, p, _ in self._customer_lines(run_id, customer_id) if (m, p) == (meter, period))
        return next(found, None)

    def list_runs(self, filters: dict[str, str], limit: int = 100) -> list[dict[str, Any]]:
        """Runs, newest first, filtered by invoice_id, customer_id, period and status."""
        clauses, params = [], []
        for column in ("invoice_id", "status"):
            if filters.get(column):
                clauses.append(f"{column} = ?")
                params.append(filters[column])
        if filters.get("period"):
            # the period itself, or a run of periods from it; for a month, also a run of months
            # (`YYYY-MM..YYYY-MM`) covering it
            period = filters["period"]
            covering = ""
            if MONTH_LABEL.fullmatch(period):
                covering = """OR (length(period_label) = 16 AND period_label LIKE '____-__..____-__'
                                  AND substr(period_label, 1, 7) <= ? AND substr(period_label, 10, 7) >= ?)"""
            clauses.append(f"(period_label = ? OR period_label LIKE ? ESCAPE '\\' {covering})")
            params += [period, _like_prefix(period) + "..%"] + ([period, period] if covering else [])
        if filters.get("customer_id"):
            clauses.append("(customer_id = ? OR run_id IN (SELECT run_id FROM run_customers WHERE customer_id = ?))")
            params += [filters["customer_id"], filters["customer_id"]]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"""SELECT run_id, invoice_id, customer_id, period_label AS period, status, created_at,
                         config_hash, calculation_version
                  FROM runs {where} ORDER BY created_at DESC, run_id DESC LIMIT ?"""
        return self.backend.query(sql, [*params, limit])

    def discrepancies(self) -> Iterator[dict[str, Any]]:
        yield from self.backend.query("SELECT * FROM discrepancies ORDER BY customer_id, meter, period, class")

    # -- webhook inbox ------------------------------------------------------------

    def save_event(self, event: Any) -> bool:
        """Store a verified event (one statement, committed); False (and nothing changed) if its id is stored."""
        received = now()
        return (
            self.backend.execute(
                """INSERT INTO inbox (provider, event_id, type, account, subject, body, received_at, available_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (provider, event_id) DO NOTHING""",
                [
                    event.provider,
                    event.event_id,
                    event.type,
                    event.account,
                    event.subject,
                    event.body,
                    received,
                    received,
                ],
            )
            == 1
        )

    def claim(self, worker: str, at: datetime, lease: timedelta) -> Claimed | None:
        """Take the oldest ready event (or one whose lease ran out) under a lease.

        Several workers may claim at once: each event goes to one of them."""
        row = self.backend.claim(worker, stamp(at), stamp(at + lease))
        return Claimed(*row) if row else None

    def renew(self, claimed: Claimed, worker: str, until: datetime) -> bool:
        """Extend the lease while the work goes on; False if another worker took the event."""
        return self._update_claimed(claimed, worker, "lease_until = ?", [stamp(until)])

    def finish(self, claimed: Claimed, worker: str, status: str, run_id: str | None = None) -> bool:
        """Mark a claimed event done or ignored; False if the lease was lost meanwhile."""
        return self._update_claimed(
            claimed, worker, "status = ?, run_id = ?, finished_at = ?, last_error = NULL", [status, run_id, now()]
        )

    def fail(self, claimed: Claimed, worker: str, error: str, retry_at: datetime | None) -> bool:
        """Record the error; retry at `retry_at`, or park the event as dead when it is None."""
        if retry_at is None:
            return self._update_claimed(
                claimed, worker, "status = 'dead', last_error = ?, finished_at = ?", [error, now()]
            )
        return self._update_claimed(
            claimed, worker, "status = 'pending', last_error = ?, available_at = ?", [error, stamp(retry_at)]
        )

    def _update_claimed(self, claimed: Claimed, worker: str, assignments: str, values: list[Any]) -> bool:
        changed = self.backend.execute(
            f"""UPDATE inbox SET {assignments}
                WHERE provider = ? AND event_id = ? AND worker = ? AND status = 'processing'""",
            [*values, claimed.provider, claimed.event_id, worker],
        )
        return changed == 1

    def replay(self, event_ids: list[str], since: datetime | None = None) -> int:
        """Put events back in the queue (by id, or every one received since a time); returns how many."""
        if event_ids:
            marks = ",".join("?" * len(event_ids))
            where, params = f"event_id IN ({marks})", list(event_ids)
        elif since is not None:
            where, params = "received_at >= ?", [stamp(since)]
        else:
            where, params = "status = 'dead'", []
        return self.backend.execute(
            f"""UPDATE inbox SET status = 'pending', attempts = 0, available_at = ?, lease_until = NULL,
                       worker = NULL WHERE status <> 'processing' AND {where}""",
            [now(), *params],
        )

    def covers(self, provider: str, invoice_id: str) -> bool:
        """Whether a stored event or run is about this invoice already."""
        row = self.backend.one(
            """SELECT 1 FROM inbox WHERE provider = ? AND subject = ?
               UNION ALL SELECT 1 FROM runs WHERE invoice_id = ? LIMIT 1""",
            [provider, invoice_id, invoice_id],
        )
        return row is not None

    def events(self, status: str | None = None) -> list[dict[str, Any]]:
        """Inbox rows without their bodies, oldest first."""
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        return self.backend.query(
            f"""SELECT provider, event_id, type, status, attempts, received_at, last_error, run_id, worker
                FROM inbox {where} ORDER BY received_at, event_id""",
            params,
        )

    # -- timing watch-list --------------------------------------------------------

    def _watch(self, run_id: str, lines: list[dict[str, Any]]) -> None:
        """Open a timing item for each timing line; mark cleared the items a catch-up cleared.
        One statement each for all the lines (a big run has thousands; on PostgreSQL a statement
        each was a round trip each). An item is opened by a line of an earlier period than the
        line clearing it, so opening them all first keeps the lines' order."""
        opened = [
            (line["customer_id"], line["meter"], line["period"], run_id, line["late_units"])
            for line in lines
            if line["class"] == "timing"
        ]
        cleared = [
            (
                json.dumps({"run_id": run_id, "invoice_id": _first_invoice(line), "period": line["period"]}),
                ref["customer_id"],
                ref["meter"],
                ref["period"],
            )
            for line in lines
            for ref in line["evidence"]["clears"]
        ]
        if opened:
            self.backend.executemany(
                """INSERT INTO watchlist (customer_id, meter, period, status, opened_by, late_units)
                   VALUES (?, ?, ?, 'open', ?, ?) ON CONFLICT (customer_id, meter, period) DO NOTHING""",
                opened,
            )
        if cleared:
            self.backend.executemany(
                """UPDATE watchlist SET status = 'cleared', cleared_by = ?
                   WHERE customer_id = ? AND meter = ? AND period = ? AND status = 'open'""",
                cleared,
            )

    def watchlist(self, include_closed: bool = False) -> list[dict[str, Any]]:
        where = "" if include_closed else "WHERE status = 'open'"
        items = []
        for row in self.backend.query(f"SELECT * FROM watchlist {where} ORDER BY customer_id, meter, period"):
            items.append(
                {
                    "customer_id": row["customer_id"],
                    "meter": row["meter"],
                    "period": row["period"],
                    "status": row["status"],
                    "late_units": row["late_units"],
                    "opened_by": row["opened_by"],
                    "cleared_by": json.loads(row["cleared_by"]) if row["cleared_by"] else None,
                    "cycles": row["cycles"],
                    "escalated_by": row["escalated_by"],
                }
            )
        return items

    def defer_checkpoints(self, backstop_pages: int = 10_000) -> None:
        """SQLite: leave WAL checkpoints to `checkpoint()` (the worker's idle loop), off the request path;
        SQLite still checkpoints by itself past `backstop_pages`. PostgreSQL: nothing to do."""
        self.backend.defer_checkpoints(backstop_pages)

    def checkpoint(self) -> None:
        """SQLite: move the WAL into the database without blocking readers or writers."""
        self.backend.checkpoint()

    def ping(self) -> bool:
        try:
            self.backend.one("SELECT 1")
        except self.backend.error:
            return False
        return True

    # -- routing: watch-list re-checks and the lines routing reads -------------------
    # Portable SQL only (`?` placeholders, ON CONFLICT, ISO text times): SQLite and PostgreSQL.

    def recheck_watchlist(self, run_id: str, escalate_after: int) -> list[dict[str, Any]]:
        """Count a cycle on each open timing item of a key this run saw in a later period without
        clearing it; escalate the items that reach `escalate_after` cycles. Returns those escalated now.

        A cycle is one later period: re-running the same period counts once. Each open item is
        looked up among its customer's lines in the run (run_customers), so a run of 500,000
        keys is not walked line by line; a run of one period holds lines of that period only
        (`_RUNS_OF_PERIOD`), so it looks up only the items of earlier periods."""
        escalated = []
        pages: dict[tuple[str, int], PageKeys] = {}
        with self.backend.transaction():
            open_items = self.backend.tuples(
                """SELECT customer_id, meter, period FROM watchlist WHERE status = 'open'
                   ORDER BY customer_id, meter, period"""
            )
            row = self.backend.one("SELECT period_label FROM runs WHERE run_id = ?", [run_id])
            if row is not None and ".." not in row[0]:  # compared here, as the lines' periods are
                open_items = [item for item in open_items if item[2] < row[0]]
            seen_later = [
                (customer, meter, period, seen)
                for customer, meter, period in open_items
                for seen in sorted(
                    {p for _, m, p, _ in self._customer_lines(run_id, customer, pages) if m == meter and p > period}
                )
            ]
            for customer, meter, period, seen in seen_later:
                self.backend.execute(
                    """INSERT INTO watch_checks (customer_id, meter, period, checked_period, run_id, checked_at)
                       VALUES (?, ?, ?, ?, ?, ?)
                       ON CONFLICT (customer_id, meter, period, checked_period) DO NOTHING""",
                    [customer, meter, period, seen, run_id, now()],
                )
                counted = self.backend.one(
                    "SELECT count(*) FROM watch_checks WHERE customer_id = ? AND meter = ? AND period = ?",
                    [customer, meter, period],
                )
                cycles = int(counted[0]) if counted else 0
                escalate = cycles >= escalate_after
                changed = self.backend.execute(
                    """UPDATE watchlist SET cycles = ?, status = ?, escalated_by = ?
                       WHERE customer_id = ? AND meter = ? AND period = ? AND status = 'open'""",
                    [
                        cycles,
                        "escalated" if escalate else "open",
                        run_id if escalate else None,
                        customer,
                        meter,
                        period,
                    ],
                )
                if escalate and changed == 1:
                    escalated.append({"customer_id": customer, "meter": meter, "period": period, "cycles": cycles})
        return escalated

    def escalated_in(self, run_id: str) -> list[dict[str, Any]]:
        """The watch-list items a run escalated."""
        return self.backend.query(
            """SELECT customer_id, meter, period, cycles FROM watchlist WHERE escalated_by = ?
               ORDER BY customer_id, meter, period""",
            [run_id],
        )

    def opening_line(self, customer_id: str, meter: str, period: str) -> dict[str, Any] | None:
        """The timing line that opened a watch-list item, as its run reported it."""
        row = self.backend.one(
            "SELECT opened_by FROM watchlist WHERE customer_id = ? AND meter = ? AND period = ?",
            [customer_id, meter, period],
        )
        position = self._position_of(row[0], customer_id, meter, period) if row else None
        return self._line_at(row[0], position) if row and position is not None else None

    def latest_line(self, customer_id: str, meter: str, period: str) -> tuple[str, dict[str, Any]] | None:
        """The newest finished run's line for a key, with that run's id. Only the runs of the
        customer that may hold the period are read (see `_RUNS_OF_PERIOD`)."""
        runs = self.backend.tuples(
            f"""SELECT run_id FROM runs
                WHERE status = 'done' AND {_RUNS_OF_PERIOD}
                    AND run_id IN (SELECT run_id FROM run_customers WHERE customer_id = ?)
                ORDER BY created_at DESC, run_id DESC""",
            [period, "%..%", customer_id],
        )
        for (run_id,) in runs:
            position = self._position_of(run_id, customer_id, meter, period)
            if position is not None:
                return run_id, self._line_at(run_id, position)
        return None

    def period_lines(self, period: str) -> list[dict[str, Any]]:
        """The newest finished run's line for every key of a period (every customer and meter):
        every page's keys of the runs that may hold the period (`_RUNS_OF_PERIOD`), then the
        texts of the lines found."""
        runs = self.backend.tuples(
            f"SELECT run_id FROM runs WHERE status = 'done' AND {_RUNS_OF_PERIOD} ORDER BY created_at, run_id",
            [period, "%..%"],
        )
        latest: dict[tuple[str, str], tuple[str, int]] = {}
        for (run_id,) in runs:
            for first, body in self._pages(run_id, "keys"):
                keys = unpack_keys(body)
                for index, found in enumerate(keys.periods):
                    if found == period:
                        latest[(keys.customers[index], keys.meters[index])] = (run_id, first + index)
        by_run: dict[str, list[int]] = {}
        for run_id, position in latest.values():
            by_run.setdefault(run_id, []).append(position)
        texts = {
            (run_id, position): text
            for run_id, positions in by_run.items()
            for position, text in zip(sorted(positions), self._texts_at(run_id, sorted(positions)), strict=True)
        }
        return [parse_line(texts[latest[key]]) for key in sorted(latest)]

    def run_provider(self, run_id: str) -> str | None:
        """The platform whose event made the run (`stripe`, `orb`), if an event made it."""
        row = self.backend.one("SELECT provider FROM inbox WHERE run_id = ? ORDER BY received_at LIMIT 1", [run_id])
        return row[0] if row else None

    def run_invoice(self, run_id: str) -> str | None:
        row = self.backend.one("SELECT invoice_id FROM runs WHERE run_id = ?", [run_id])
        return row[0] if row else None


class RoutingLog:
    """The routing audit trail: every message, ticket, decision and write-back, by key and run.

    `key` is a discrepancy key (rules.routing.discrepancy_key: customer × meter × period).
    Portable SQL only, on the same database as the `Store` it is built from.
    """

    def __init__(self, store: Store) -> None:
        self.backend = store.backend

    def _all(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        return self.backend.query(sql, params)

    def _one(self, sql: str, params: list[Any]) -> dict[str, Any] | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _write(self, sql: str, params: list[Any]) -> int:
        return self.backend.execute(sql, params)

    # -- messages (one per key and destination, updated in place) --

    def message(self, key: str, destination: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM route_messages WHERE key = ? AND destination = ?", [key, destination])

    def messages(self, key: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM route_messages WHERE key = ? ORDER BY destination", [key])

    def save_message(
        self, key: str, destination: str, channel: str, ts: str, run_id: str, fingerprint: str, summary: str
    ) -> None:
        """Record a message posted or updated (and let go of its `posting` mark)."""
        at = now()
        with self.backend.transaction():
            self._write(
                """INSERT INTO route_messages (key, destination, channel, ts, run_id, fingerprint, summary,
                       posted_at, updated_at, updates)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
                   ON CONFLICT (key, destination) DO UPDATE SET run_id = excluded.run_id,
                       fingerprint = excluded.fingerprint, summary = excluded.summary,
                       updated_at = excluded.updated_at, updates = route_messages.updates + 1""",
                [key, destination, channel, ts, run_id, fingerprint, summary, at, at],
            )
            self.clear_posting(key, destination)

    def posting(self, key: str, destination: str) -> str | None:
        """The Slack timestamp before which a post of this key was started and not recorded, if one was."""
        row = self._one("SELECT since FROM route_posting WHERE key = ? AND destination = ?", [key, destination])
        return row["since"] if row else None

    def mark_posting(self, key: str, destination: str, since: str) -> None:
        """Note, before calling Slack, that a post is under way (the first attempt's mark is kept)."""
        self._write(
            """INSERT INTO route_posting (key, destination, since) VALUES (?, ?, ?)
               ON CONFLICT (key, destination) DO NOTHING""",
            [key, destination, since],
        )

    def clear_posting(self, key: str, destination: str) -> None:
        self._write("DELETE FROM route_posting WHERE key = ? AND destination = ?", [key, destination])

    # -- tickets (one per key and queue) --

    def ticket(self, key: str, queue: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM route_tickets WHERE key = ? AND queue = ?", [key, queue])

    def save_ticket(self, key: str, queue: str, external_id: str, reference: str, url: str, run_id: str) -> None:
        self._write(
            """INSERT INTO route_tickets (key, queue, external_id, reference, url, run_id, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key, queue) DO NOTHING""",
            [key, queue, external_id, reference, url, run_id, now()],
        )

    # -- decisions (stages: proposed, confirmed, final) --

    def decide(
        self, key: str, stage: str, action: str, user_id: str, user_name: str, run_id: str, event_id: str
    ) -> bool:
        """Record a stage of a decision; False (nothing written) if that stage is already taken."""
        return (
            self._write(
                """INSERT INTO route_decisions (key, stage, action, user_id, user_name, run_id, event_id, decided_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key, stage) DO NOTHING""",
                [key, stage, action, user_id, user_name, run_id, event_id, now()],
            )
            == 1
        )

    def decisions(self, key: str) -> dict[str, dict[str, Any]]:
        rows = self._all("SELECT * FROM route_decisions WHERE key = ? ORDER BY decided_at", [key])
        return {row["stage"]: row for row in rows}

    # -- write-backs (one per idempotency key) --

    def writeback(self, idempotency_key: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM route_writebacks WHERE idempotency_key = ?", [idempotency_key])

    def save_writeback(self, idempotency_key: str, key: str, facts: dict[str, str], run_id: str) -> None:
        """Record a write-back (and let go of its `writing` mark). `facts`: platform, kind
        (charge | credit), amount, currency and platform_id."""
        with self.backend.transaction():
            self._write(
                """INSERT INTO route_writebacks (idempotency_key, key, platform, kind, amount, currency,
                       platform_id, run_id, written_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING""",
                [
                    idempotency_key,
                    key,
                    facts["platform"],
                    facts["kind"],
                    facts["amount"],
                    facts["currency"],
                    facts["platform_id"],
                    run_id,
                    now(),
                ],
            )
            self._write("DELETE FROM route_writing WHERE idempotency_key = ?", [idempotency_key])

    def writing(self, idempotency_key: str) -> dict[str, Any] | None:
        """The write-back under this key that was begun and not recorded, if one was: `since`
        (when) and `facts` (what it sent: customer_id, invoice_id, amount, currency)."""
        row = self._one("SELECT since, facts FROM route_writing WHERE idempotency_key = ?", [idempotency_key])
        return {"since": row["since"], "facts": json.loads(row["facts"])} if row else None

    def mark_writing(self, idempotency_key: str, since: str, facts: dict[str, Any]) -> None:
        """Note, before calling the platform, that a write-back is under way and what it sends.
        A mark left by an attempt that wrote nothing (it was looked for) is replaced."""
        self._write(
            """INSERT INTO route_writing (idempotency_key, since, facts) VALUES (?, ?, ?)
               ON CONFLICT (idempotency_key) DO UPDATE SET since = excluded.since, facts = excluded.facts""",
            [idempotency_key, since, json.dumps(facts, sort_keys=True)],
        )

    def writebacks(self, period: str | None = None) -> list[dict[str, Any]]:
        """Write-backs, oldest first; with `period`, only those of keys in that period."""
        if period is None:
            return self._all("SELECT * FROM route_writebacks ORDER BY written_at", [])
        return self._all("SELECT * FROM route_writebacks WHERE key LIKE ? ORDER BY written_at", [f"%|{period}"])

    def decided(self, period: str) -> frozenset[str]:
        """Keys of a period with a final decision."""
        rows = self._all("SELECT key FROM route_decisions WHERE stage = 'final' AND key LIKE ?", [f"%|{period}"])
        return frozenset(r["key"] for r in rows)

    def trail(self, key: str) -> dict[str, list[dict[str, Any]]]:
        """Everything routing did about one key, for the audit."""
        return {
            "messages": self.messages(key),
            "tickets": self._all("SELECT * FROM route_tickets WHERE key = ? ORDER BY queue", [key]),
            "decisions": self._all("SELECT * FROM route_decisions WHERE key = ? ORDER BY decided_at", [key]),
            "writebacks": self._all("SELECT * FROM route_writebacks WHERE key = ? ORDER BY written_at", [key]),
        }


def _run_values(record: RunRecord) -> list[Any]:
    """The run's columns from period_start to customer_id, in RUN_COLUMNS order."""
    return [
        record.period_start,
        record.period_end,
        record.period_label,
        record.config_hash,
        record.calculation_version,
        json.dumps(record.inputs, sort_keys=True),
        json.dumps(record.customers),
        record.invoice_id,
        record.customer_id,
    ]


def _first_invoice(line: dict[str, Any]) -> str | None:
    ids = line["evidence"]["invoice_ids"]
    return ids[0] if ids else None
