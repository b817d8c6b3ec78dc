"""The only module that touches the database: runs, their lines, discrepancies, timing items.

SQLite through sqlite-utils is the embedded default. A run is written in one
transaction (no half-written run) and never changed afterwards; its id comes
from its inputs, so saving the same run again writes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

SCHEMA_VERSION = 1


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
    return datetime.now(UTC).isoformat(timespec="seconds")


class Store:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

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
        store = cls(db)
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

    def save_run(self, record: RunRecord, summary: dict[str, Any], lines: list[dict[str, Any]]) -> bool:
        """Store a finished run with its lines and discrepancies; False if it was already stored."""
        if self.run_exists(record.run_id):
            return False
        try:
            self._insert_run(record, summary, lines)
        except sqlite3.IntegrityError:
            if self.run_exists(record.run_id):
                return False  # another process stored the same run first
            raise
        return True

    def _insert_run(self, record: RunRecord, summary: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        with self.db.atomic():
            self.db["runs"].insert(
                {
                    **record.__dict__,
                    "inputs": json.dumps(record.inputs, sort_keys=True),
                    "customers": json.dumps(record.customers),
                    "status": "done",
                    "created_at": now(),
                    "summary": json.dumps(summary, sort_keys=True),
                }
            )
            self.db["run_lines"].insert_all(
                (_line_row(record.run_id, position, line) for position, line in enumerate(lines)),
                batch_size=5000,
            )
            self._record_discrepancies(record.run_id, lines)
            self._watch(record.run_id, lines)

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

    def run_exists(self, run_id: str) -> bool:
        return bool(self.db.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone())

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

    def ping(self) -> bool:
        try:
            self.db.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True


def _first_invoice(line: dict[str, Any]) -> str | None:
    ids = line["evidence"]["invoice_ids"]
    return ids[0] if ids else None


def _line_row(run_id: str, position: int, line: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "position": position,
        "customer_id": line["customer_id"],
        "meter": line["meter"],
        "period": line["period"],
        "class": line["class"],
        "line": json.dumps(line, separators=(",", ":")),
    }


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


MIGRATIONS = {1: _schema_1}
