"""The only module that touches the database: runs, their lines, discrepancies, timing items.

SQLite through sqlite-utils is the embedded default. A run is written in one
transaction (no half-written run) and never changed afterwards; its id comes
from its inputs, so saving the same run again writes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import sqlite_utils

SCHEMA_VERSION = 2
INBOX_STATES = ("pending", "processing", "done", "ignored", "dead")


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


def sqlite_path(url: str) -> str:
    """`sqlite:///recon.db` → `recon.db`; `sqlite:////abs/x.db` → `/abs/x.db`."""
    if not url.startswith("sqlite:///"):
        raise StoreError(
            f"RECON_DATABASE_URL: expected sqlite:///path or postgresql://... (got {url.split(':')[0]}:...)"
        )
    return url[len("sqlite:///") :] or ":memory:"


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


class Store:
    def __init__(self, db: sqlite_utils.Database, url: str = "sqlite:///:memory:") -> None:
        self.db = db
        self.url = url

    @classmethod
    def open(cls, url: str) -> Store:
        path = sqlite_path(url)
        try:
            if path == ":memory:":
                db = sqlite_utils.Database(memory=True)
            else:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                db = sqlite_utils.Database(sqlite3.connect(path, timeout=30, check_same_thread=False))
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        store = cls(db, url)
        store.migrate()
        return store

    # -- schema -----------------------------------------------------------------

    def migrate(self) -> int:
        """Bring the schema forward to `SCHEMA_VERSION`; returns the version found."""
        meta = self.db["schema_version"]
        found = 0
        if meta.exists():
            found = self.db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        for version in range(found + 1, SCHEMA_VERSION + 1):
            with self.db.atomic():
                MIGRATIONS[version](self.db)
                self.db["schema_version"].insert({"version": version, "applied_at": now()})
        return found

    def schema_version(self) -> int:
        return self.db.execute("SELECT max(version) FROM schema_version").fetchone()[0]

    # -- runs -------------------------------------------------------------------

    def save_run(self, record: RunRecord, summary: dict[str, Any], lines: Iterable[dict[str, Any]]) -> bool:
        """Store a finished run with its lines and discrepancies; False if it was already done.

        A run started earlier (`start_run`) and cut short is completed under the same id.
        """
        if self.run_status(record.run_id) == "done":
            return False
        try:
            self._insert_run(record, summary, lines)
        except sqlite3.IntegrityError:
            if self.run_status(record.run_id) == "done":
                return False  # another process finished the same run first
            raise
        return True

    def start_run(self, record: RunRecord) -> str:
        """Record that a run is under way (status `running`); returns the run's status."""
        with self.db.atomic():
            self.db.conn.execute(
                """INSERT INTO runs (run_id, status, created_at, period_start, period_end, period_label,
                       config_hash, calculation_version, inputs, customers, invoice_id, customer_id)
                   VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
                [
                    record.run_id,
                    now(),
                    record.period_start,
                    record.period_end,
                    record.period_label,
                    record.config_hash,
                    record.calculation_version,
                    json.dumps(record.inputs, sort_keys=True),
                    json.dumps(record.customers),
                    record.invoice_id,
                    record.customer_id,
                ],
            )
        return self.run_status(record.run_id) or "running"

    def run_status(self, run_id: str) -> str | None:
        row = self.db.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return row[0] if row else None

    def _insert_run(self, record: RunRecord, summary: dict[str, Any], lines: Iterable[dict[str, Any]]) -> None:
        with self.db.atomic():
            started = self.run_status(record.run_id) is not None
            row = {
                **record.__dict__,
                "inputs": json.dumps(record.inputs, sort_keys=True),
                "customers": json.dumps(record.customers),
                "status": "done",
                "summary": json.dumps(summary, sort_keys=True),
            }
            if started:
                self.db["runs"].update(record.run_id, row)
                self.db.conn.execute("DELETE FROM run_lines WHERE run_id = ?", [record.run_id])
            else:
                self.db["runs"].insert({**row, "created_at": now()})
            self._insert_lines(record.run_id, lines)

    def _insert_lines(self, run_id: str, lines: Iterable[dict[str, Any]]) -> None:
        """The run's lines in one pass (they may be made one at a time), then its discrepancies
        and timing items, in the order of the lines."""
        breaks: list[dict[str, Any]] = []
        timing: list[dict[str, Any]] = []

        def rows() -> Iterator[tuple[Any, ...]]:
            for position, line in enumerate(lines):
                if line["class"] != "match":
                    breaks.append(line)
                if line["class"] == "timing" or line["evidence"]["clears"]:
                    timing.append(line)
                yield _line_row(run_id, position, line)

        self.db.conn.executemany(
            """INSERT INTO run_lines (run_id, position, customer_id, meter, period, class, line)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            rows(),
        )
        self._record_discrepancies(run_id, breaks)
        self._watch(run_id, timing)

    def _record_discrepancies(self, run_id: str, lines: list[dict[str, Any]]) -> None:
        rows = [
            {
                "customer_id": ln["customer_id"],
                "meter": ln["meter"],
                "period": ln["period"],
                "class": ln["class"],
                "first_run_id": run_id,
                "last_run_id": run_id,
                "delta_amount": ln["delta_amount"],
                "currency": ln["currency"],
                "break_at": ln["break_at"],
                "cause": ln["cause"],
            }
            for ln in lines
            if ln["class"] != "match"
        ]
        self.db.conn.executemany(
            """INSERT INTO discrepancies (customer_id, meter, period, class, first_run_id, last_run_id,
                   delta_amount, currency, break_at, cause)
               VALUES (:customer_id, :meter, :period, :class, :first_run_id, :last_run_id,
                   :delta_amount, :currency, :break_at, :cause)
               ON CONFLICT (customer_id, meter, period, class) DO UPDATE SET
                   last_run_id = excluded.last_run_id, delta_amount = excluded.delta_amount,
                   break_at = excluded.break_at, cause = excluded.cause""",
            rows,
        )

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run's report in the contract's shape, or None."""
        rows = list(self.db.query("SELECT * FROM runs WHERE run_id = ?", [run_id]))
        if not rows:
            return None
        run = rows[0]
        lines = [
            json.loads(r["line"])
            for r in self.db.query("SELECT line FROM run_lines WHERE run_id = ? ORDER BY position", [run_id])
        ]
        return {
            "run_id": run_id,
            "status": run["status"],
            "period": {"start": run["period_start"], "end": run["period_end"], "label": run["period_label"]},
            "summary": json.loads(run["summary"]),
            "lines": lines,
        }

    def list_runs(self, filters: dict[str, str], limit: int = 100) -> list[dict[str, Any]]:
        """Runs, newest first, filtered by invoice_id, customer_id, period and status."""
        clauses, params = [], []
        for column in ("invoice_id", "status"):
            if filters.get(column):
                clauses.append(f"{column} = ?")
                params.append(filters[column])
        if filters.get("period"):
            clauses.append("(period_label = ? OR period_label LIKE ? || '..%')")
            params += [filters["period"], filters["period"]]
        if filters.get("customer_id"):
            clauses.append("(customer_id = ? OR run_id IN (SELECT run_id FROM run_lines WHERE customer_id = ?))")
            params += [filters["customer_id"], filters["customer_id"]]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"""SELECT run_id, invoice_id, customer_id, period_label AS period, status, created_at,
                         config_hash, calculation_version
                  FROM runs {where} ORDER BY created_at DESC, rowid DESC LIMIT ?"""
        return list(self.db.query(sql, [*params, limit]))

    def discrepancies(self) -> Iterator[dict[str, Any]]:
        yield from self.db.query("SELECT * FROM discrepancies ORDER BY customer_id, meter, period, class")

    # -- webhook inbox ------------------------------------------------------------

    def save_event(self, event: Any) -> bool:
        """Store a verified event; False (and nothing changed) if its id is already stored."""
        received = now()
        cursor = self.db.conn.execute(
            """INSERT INTO inbox (provider, event_id, type, account, subject, body, received_at, available_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
            [event.provider, event.event_id, event.type, event.account, event.subject, event.body, received, received],
        )
        self.db.conn.commit()
        return cursor.rowcount == 1

    def claim(self, worker: str, at: datetime, lease: timedelta) -> Claimed | None:
        """Take the oldest ready event (or one whose lease ran out) under a lease."""
        cursor = self.db.conn.execute(
            """UPDATE inbox SET status = 'processing', attempts = attempts + 1, worker = :worker,
                      lease_until = :lease_until
               WHERE rowid = (
                   SELECT rowid FROM inbox
                   WHERE (status = 'pending' AND available_at <= :now)
                      OR (status = 'processing' AND lease_until < :now)
                   ORDER BY received_at LIMIT 1)
               RETURNING provider, event_id, type, account, body, attempts""",
            {"worker": worker, "now": stamp(at), "lease_until": stamp(at + lease)},
        )
        row = cursor.fetchone()
        self.db.conn.commit()
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
        cursor = self.db.conn.execute(
            f"""UPDATE inbox SET {assignments}
                WHERE provider = ? AND event_id = ? AND worker = ? AND status = 'processing'""",
            [*values, claimed.provider, claimed.event_id, worker],
        )
        self.db.conn.commit()
        return cursor.rowcount == 1

    def replay(self, event_ids: list[str], since: datetime | None = None) -> int:
        """Put events back in the queue (by id, or every one received since a time); returns how many."""
        if event_ids:
            marks = ",".join("?" * len(event_ids))
            where, params = f"event_id IN ({marks})", list(event_ids)
        elif since is not None:
            where, params = "received_at >= ?", [stamp(since)]
        else:
            where, params = "status = 'dead'", []
        cursor = self.db.conn.execute(
            f"""UPDATE inbox SET status = 'pending', attempts = 0, available_at = ?, lease_until = NULL,
                       worker = NULL WHERE status <> 'processing' AND {where}""",
            [now(), *params],
        )
        self.db.conn.commit()
        return cursor.rowcount

    def covers(self, provider: str, invoice_id: str) -> bool:
        """Whether a stored event or run is about this invoice already."""
        row = self.db.execute(
            """SELECT 1 FROM inbox WHERE provider = ? AND subject = ?
               UNION ALL SELECT 1 FROM runs WHERE invoice_id = ? LIMIT 1""",
            [provider, invoice_id, invoice_id],
        ).fetchone()
        return row is not None

    def events(self, status: str | None = None) -> list[dict[str, Any]]:
        """Inbox rows without their bodies, oldest first."""
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        return list(
            self.db.query(
                f"""SELECT provider, event_id, type, status, attempts, received_at, last_error, run_id
                    FROM inbox {where} ORDER BY received_at""",
                params,
            )
        )

    # -- timing watch-list --------------------------------------------------------

    def _watch(self, run_id: str, lines: list[dict[str, Any]]) -> None:
        """Open a timing item for each timing line; mark cleared the items a catch-up cleared."""
        for line in lines:
            if line["class"] == "timing":
                self.db.execute(
                    """INSERT INTO watchlist (customer_id, meter, period, status, opened_by, late_units)
                       VALUES (?, ?, ?, 'open', ?, ?) ON CONFLICT DO NOTHING""",
                    [line["customer_id"], line["meter"], line["period"], run_id, line["late_units"]],
                )
            for ref in line["evidence"]["clears"]:
                self.db.execute(
                    """UPDATE watchlist SET status = 'cleared', cleared_by = ?
                       WHERE customer_id = ? AND meter = ? AND period = ? AND status = 'open'""",
                    [
                        json.dumps({"run_id": run_id, "invoice_id": _first_invoice(line), "period": line["period"]}),
                        ref["customer_id"],
                        ref["meter"],
                        ref["period"],
                    ],
                )

    def watchlist(self, include_closed: bool = False) -> list[dict[str, Any]]:
        where = "" if include_closed else "WHERE status = 'open'"
        items = []
        for row in self.db.query(f"SELECT * FROM watchlist {where} ORDER BY customer_id, meter, period"):
            items.append(
                {
                    "customer_id": row["customer_id"],
                    "meter": row["meter"],
                    "period": row["period"],
                    "status": row["status"],
                    "late_units": row["late_units"],
                    "opened_by": row["opened_by"],
                    "cleared_by": json.loads(row["cleared_by"]) if row["cleared_by"] else None,
                }
            )
        return items

    def defer_checkpoints(self, backstop_pages: int = 10_000) -> None:
        """Leave WAL checkpoints to `checkpoint()` (the worker's idle loop), off the request path;
        SQLite still checkpoints by itself past `backstop_pages`."""
        self.db.execute(f"PRAGMA wal_autocheckpoint = {int(backstop_pages)}")

    def checkpoint(self) -> None:
        """Move the WAL into the database without blocking readers or writers."""
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def ping(self) -> bool:
        try:
            self.db.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True


def _first_invoice(line: dict[str, Any]) -> str | None:
    ids = line["evidence"]["invoice_ids"]
    return ids[0] if ids else None


def _line_row(run_id: str, position: int, line: dict[str, Any]) -> tuple[Any, ...]:
    return (run_id, position, line["customer_id"], line["meter"], line["period"], line["class"], _line_text(line))


def _line_text(line: dict[str, Any]) -> str:
    """The line as compact JSON with non-ASCII escaped: `json.dumps(line, separators=(",", ":"))`,
    by orjson when the text is ASCII anyway."""
    try:
        text = orjson.dumps(line)
    except orjson.JSONEncodeError:
        text = b"\x80"  # not ASCII: fall through to json
    if text.isascii():
        return text.decode()
    return json.dumps(line, separators=(",", ":"))


def _schema_1(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    db.execute(
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at TEXT NOT NULL,
            period_start TEXT NOT NULL, period_end TEXT NOT NULL, period_label TEXT NOT NULL,
            config_hash TEXT NOT NULL, calculation_version TEXT NOT NULL,
            inputs TEXT NOT NULL, customers TEXT NOT NULL,
            invoice_id TEXT, customer_id TEXT, summary TEXT)"""
    )
    db.execute("CREATE INDEX runs_invoice ON runs (invoice_id)")
    db.execute(
        """CREATE TABLE run_lines (
            run_id TEXT NOT NULL REFERENCES runs (run_id), position INTEGER NOT NULL,
            customer_id TEXT NOT NULL, meter TEXT NOT NULL, period TEXT NOT NULL, class TEXT NOT NULL,
            line TEXT NOT NULL, PRIMARY KEY (run_id, position))"""
    )
    db.execute("CREATE INDEX run_lines_customer ON run_lines (customer_id)")
    db.execute(
        """CREATE TABLE discrepancies (
            customer_id TEXT NOT NULL, meter TEXT NOT NULL, period TEXT NOT NULL, class TEXT NOT NULL,
            first_run_id TEXT NOT NULL, last_run_id TEXT NOT NULL, delta_amount TEXT NOT NULL,
            currency TEXT NOT NULL, break_at TEXT NOT NULL, cause TEXT NOT NULL,
            PRIMARY KEY (customer_id, meter, period, class))"""
    )
    db.execute(
        """CREATE TABLE watchlist (
            customer_id TEXT NOT NULL, meter TEXT NOT NULL, period TEXT NOT NULL,
            status TEXT NOT NULL, opened_by TEXT NOT NULL, late_units TEXT NOT NULL,
            cleared_by TEXT, PRIMARY KEY (customer_id, meter, period))"""
    )


def _schema_2(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE inbox (
            provider TEXT NOT NULL, event_id TEXT NOT NULL, type TEXT NOT NULL, account TEXT,
            subject TEXT, body TEXT NOT NULL, received_at TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
            available_at TEXT NOT NULL, lease_until TEXT, worker TEXT, last_error TEXT,
            run_id TEXT, finished_at TEXT, PRIMARY KEY (provider, event_id))"""
    )
    db.execute("CREATE INDEX inbox_ready ON inbox (status, available_at)")
    db.execute("CREATE INDEX inbox_subject ON inbox (provider, subject)")


MIGRATIONS = {1: _schema_1, 2: _schema_2}
