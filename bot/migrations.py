"""The store's schema, version by version: `MIGRATIONS[N - 1]` brings a database to version N.

`bot.store.Store.migrate` runs the steps a database lacks, in order, each in one transaction
with the version it reaches. Append a step; never edit one. Portable SQL (SQLite and
PostgreSQL), as in `bot.store`; a step that moves stored runs reads and writes them here.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby

from bot.database import Backend
from bot.pages import LINES_PER_PAGE, pack, pack_keys, unpack
from rules.report import parse_line


def _schema_1(db: Backend) -> None:
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


def _schema_2(db: Backend) -> None:
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


def _schema_3(db: Backend) -> None:
    """The claim walks the events still to do in arrival order, without sorting the finished ones."""
    db.execute("CREATE INDEX inbox_open ON inbox (received_at) WHERE status IN ('pending', 'processing')")


def _schema_4(db: Backend) -> None:
    """Routing: messages, tickets, decisions, write-backs; watch-list cycles and escalation."""
    db.execute("ALTER TABLE watchlist ADD COLUMN cycles INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE watchlist ADD COLUMN escalated_by TEXT")
    db.execute(
        """CREATE TABLE watch_checks (
            customer_id TEXT NOT NULL, meter TEXT NOT NULL, period TEXT NOT NULL, checked_period TEXT NOT NULL,
            run_id TEXT NOT NULL, checked_at TEXT NOT NULL,
            PRIMARY KEY (customer_id, meter, period, checked_period))"""
    )
    db.execute(
        """CREATE TABLE route_messages (
            key TEXT NOT NULL, destination TEXT NOT NULL, channel TEXT NOT NULL, ts TEXT NOT NULL,
            run_id TEXT NOT NULL, fingerprint TEXT NOT NULL, summary TEXT NOT NULL,
            posted_at TEXT NOT NULL, updated_at TEXT NOT NULL, updates INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (key, destination))"""
    )
    db.execute(
        """CREATE TABLE route_tickets (
            key TEXT NOT NULL, queue TEXT NOT NULL, external_id TEXT NOT NULL, reference TEXT NOT NULL,
            url TEXT NOT NULL, run_id TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (key, queue))"""
    )
    db.execute(
        """CREATE TABLE route_decisions (
            key TEXT NOT NULL, stage TEXT NOT NULL, action TEXT NOT NULL, user_id TEXT NOT NULL,
            user_name TEXT NOT NULL, run_id TEXT NOT NULL, event_id TEXT NOT NULL, decided_at TEXT NOT NULL,
            PRIMARY KEY (key, stage))"""
    )
    db.execute(
        """CREATE TABLE route_writebacks (
            idempotency_key TEXT PRIMARY KEY, key TEXT NOT NULL, platform TEXT NOT NULL, kind TEXT NOT NULL,
            amount TEXT NOT NULL, currency TEXT NOT NULL, platform_id TEXT NOT NULL, run_id TEXT NOT NULL,
            written_at TEXT NOT NULL)"""
    )


def _schema_5(db: Backend) -> None:
    """A run's line texts move to compressed pages (bot.pages); run_lines keeps each line's key
    and class, the index the queries by key use. The runs stored so far are moved over."""
    body = "BYTEA" if db.dialect == "postgresql" else "BLOB"
    db.execute(
        f"""CREATE TABLE run_pages (
            run_id TEXT NOT NULL REFERENCES runs (run_id), first_position INTEGER NOT NULL,
            body {body} NOT NULL, PRIMARY KEY (run_id, first_position))"""
    )
    for (run_id,) in db.tuples("SELECT DISTINCT run_id FROM run_lines ORDER BY run_id"):
        texts = [
            text
            for _, text in db.tuples(
                "SELECT position, line FROM run_lines WHERE run_id = ? ORDER BY position", [run_id]
            )
        ]
        db.executemany(
            "INSERT INTO run_pages (run_id, first_position, body) VALUES (?, ?, ?)",
            [
                (run_id, first, pack(texts[first : first + LINES_PER_PAGE]))
                for first in range(0, len(texts), LINES_PER_PAGE)
            ],
        )
    db.execute("ALTER TABLE run_lines DROP COLUMN line")
    # Lookups by key (the watch-list's recheck, a key's latest line) and by customer use this one.
    db.execute("CREATE INDEX run_lines_key ON run_lines (customer_id, meter, period)")
    db.execute("DROP INDEX run_lines_customer")


def _schema_6(db: Backend) -> None:
    """A Slack post under way: marked before the call, cleared when its message is recorded, so a
    post whose answer was lost is looked for in the channel instead of posted again."""
    db.execute(
        """CREATE TABLE route_posting (
            key TEXT NOT NULL, destination TEXT NOT NULL, since TEXT NOT NULL, PRIMARY KEY (key, destination))"""
    )


def _schema_7(db: Backend) -> None:
    """run_lines (a row per line: half a million for a big book, the most costly part of storing
    it) gives way to run_customers (a row per customer: where their lines start, how many) and
    each page's own keys and classes (run_pages.keys, compressed; run_pages.breaks, how many of
    its lines are not matches). The runs stored so far are moved over."""
    body = "BYTEA" if db.dialect == "postgresql" else "BLOB"
    db.execute(
        """CREATE TABLE run_customers (
            run_id TEXT NOT NULL REFERENCES runs (run_id), first_position INTEGER NOT NULL,
            customer_id TEXT NOT NULL, lines INTEGER NOT NULL, PRIMARY KEY (run_id, customer_id, first_position))"""
    )
    db.execute("CREATE INDEX run_customers_customer ON run_customers (customer_id)")
    db.execute("ALTER TABLE run_pages ADD COLUMN breaks INTEGER NOT NULL DEFAULT 0")
    db.execute(f"ALTER TABLE run_pages ADD COLUMN keys {body}")
    for (run_id,) in db.tuples("SELECT DISTINCT run_id FROM run_pages ORDER BY run_id"):
        _index_run_pages(db, run_id)
    db.execute("DROP TABLE run_lines")


def _index_run_pages(db: Backend, run_id: str) -> None:
    """Version 7's index of a run stored before it: each page's keys and breaks, from run_lines
    (or, where run_lines does not hold a page's every line, from the page's own texts), and
    where each customer's lines start."""
    keyed = {
        position: key
        for position, *key in db.tuples(
            "SELECT position, customer_id, meter, period, class FROM run_lines WHERE run_id = ?", [run_id]
        )
    }
    updates, customers = [], []
    for first, body in db.tuples(
        "SELECT first_position, body FROM run_pages WHERE run_id = ? ORDER BY first_position", [run_id]
    ):
        texts = unpack(body)
        positions = range(first, first + len(texts))
        if all(p in keyed for p in positions):
            keys = [keyed[p] for p in positions]
        else:
            shown = map(parse_line, texts)
            keys = [[ln["customer_id"], ln["meter"], ln["period"], ln["class"]] for ln in shown]
        columns = [list(column) for column in zip(*keys, strict=True)] if keys else [[], [], [], []]
        classes = columns[3]
        updates.append((len(classes) - classes.count("match"), pack_keys(*columns), run_id, first))
        customers += columns[0]
    db.executemany("UPDATE run_pages SET breaks = ?, keys = ? WHERE run_id = ? AND first_position = ?", updates)
    spans, position = [], 0
    for customer, same in groupby(customers):
        count = sum(1 for _ in same)
        spans.append((run_id, position, customer, count))
        position += count
    db.insert_many("run_customers", ("run_id", "first_position", "customer_id", "lines"), spans)


def _schema_8(db: Backend) -> None:
    """A write-back under way: marked before the platform is called (with what it sends: JSON
    facts), cleared when it is recorded, so a write whose answer was lost is looked for on the
    platform, as it was sent, instead of written again."""
    db.execute(
        "CREATE TABLE route_writing (idempotency_key TEXT PRIMARY KEY, since TEXT NOT NULL, facts TEXT NOT NULL)"
    )


# The schema's history, oldest first: version N is MIGRATIONS[N - 1]. Append; never edit a step.
MIGRATIONS: list[Callable[[Backend], None]] = [
    _schema_1,
    _schema_2,
    _schema_3,
    _schema_4,
    _schema_5,
    _schema_6,
    _schema_7,
    _schema_8,
]
SCHEMA_VERSION = len(MIGRATIONS)
