"""The two database backends under `bot.store.Store`: SQLite (embedded) and PostgreSQL (several machines).

`bot/store.py` writes every query once, in SQL both databases run; this module only
runs it. What differs between the two lives here and nowhere else:

- placeholders: queries are written with `?`; PostgreSQL gets them as `%s` (a literal
  `%` in a query is escaped for it);
- connections: SQLite has one connection per `Store` (WAL, synchronous=NORMAL, in
  autocommit mode); PostgreSQL takes a connection from a psycopg_pool pool for each
  statement, or holds one for the length of a `transaction()` (per thread);
- transactions: `with backend.transaction():` groups statements (BEGIN IMMEDIATE on
  SQLite, BEGIN on PostgreSQL); outside one, each statement commits by itself, so a
  webhook's insert is one statement and one commit on either database;
- the inbox claim: SQLite's single UPDATE ... RETURNING (one writer at a time anyway);
  PostgreSQL's `FOR UPDATE SKIP LOCKED`, so several workers never wait on each other;
- schema bookkeeping: whether a table exists, and a lock held while migrating (SQLite's
  write lock; a PostgreSQL advisory lock) so processes starting together migrate once;
- SQLite's WAL checkpoints (the worker's idle loop); no-ops on PostgreSQL.

Writing a new query (in bot/store.py): portable SQL with `?` placeholders, TEXT/INTEGER/
BIGINT columns, ISO text timestamps, `INSERT ... ON CONFLICT (...) DO NOTHING/DO UPDATE
SET x = excluded.x`, `RETURNING`; no `rowid`, no `INSERT OR IGNORE`, no `::casts`. Then:

    backend.execute(sql, params) -> rows changed       backend.query(sql, params) -> [dict]
    backend.one(sql, params) -> tuple | None            backend.executemany(sql, rows)
    backend.insert_many(table, columns, rows)           (many rows of text and integers, quickly)
    with backend.transaction(): ...                     (all statements inside commit together)

A new schema version is a function appended to `bot.migrations.MIGRATIONS`, taking the
backend; it runs the same DDL on both unless `backend.dialect` says otherwise.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
import sqlite_utils
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

MIGRATION_LOCK = 7_203_114_905  # the PostgreSQL advisory lock key held while migrating

CLAIM = """UPDATE inbox SET status = 'processing', attempts = attempts + 1, worker = ?, lease_until = ?
   WHERE (provider, event_id) = (
       SELECT provider, event_id FROM inbox
       WHERE status IN ('pending', 'processing')
         AND ((status = 'pending' AND available_at <= ?) OR (status = 'processing' AND lease_until < ?))
       ORDER BY received_at LIMIT 1{lock})
   RETURNING provider, event_id, type, account, body, attempts"""


class DatabaseError(RuntimeError):
    """The database cannot be reached or opened (the message names it, never its password)."""


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _write_ahead_log(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL. On a new file another process may hold its first write (the
    migration) while we ask: that answers "locked" at once, without waiting, so retry."""
    retrying = Retrying(
        retry=retry_if_exception(_locked),
        stop=stop_after_delay(30),
        wait=wait_exponential(multiplier=0.005, max=0.25),
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            conn.execute("PRAGMA journal_mode = WAL")


class SqliteBackend:
    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            if path == ":memory:":
                conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            else:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
                _write_ahead_log(conn)
                conn.execute("PRAGMA synchronous = NORMAL")
        except (sqlite3.Error, OSError) as exc:
            raise DatabaseError(f"cannot open database {path}: {exc}") from None
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self.conn = conn
        self.integrity_error: type[Exception] = sqlite3.IntegrityError
        self.error: type[Exception] = sqlite3.Error
        self._depth = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], chunk: int = 5_000
    ) -> None:
        """Insert rows of texts and integers `chunk` at a time, each chunk handed to SQLite as one
        JSON array that json_each unpacks: one statement per chunk instead of one per row, half
        the time of `executemany` for a run's 500,000 index rows. Each statement runs on a worker
        thread (SQLite lets go of the GIL while it works) while this one makes the next chunk:
        `rows` may be a generator doing real work, which then overlaps with SQLite's. The caller
        must not use the connection until this returns. `table` and `columns` are the store's
        own names, never input."""
        picks = ", ".join(f"value ->> {i}" for i in range(len(columns)))
        sql = f"INSERT INTO {table} ({', '.join(columns)}) SELECT {picks} FROM json_each(?)"
        pending = iter(rows)
        running: Future[Any] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-insert") as pool:
            while batch := list(islice(pending, chunk)):
                packed = orjson.dumps(batch).decode()
                if running is not None:
                    running.result()
                running = pool.submit(self.conn.execute, sql, [packed])
            if running is not None:
                running.result()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def tuples(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows as tuples: for many rows, a third of the time of dicts."""
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self.conn.execute(sql, params).fetchone()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self.conn.execute("ROLLBACK")
            raise
        self._depth = 0
        self.conn.execute("COMMIT")

    @contextmanager
    def migration_lock(self) -> Iterator[None]:
        with self.transaction():  # BEGIN IMMEDIATE: the write lock, so one process migrates at a time
            yield

    def has_table(self, name: str) -> bool:
        return self.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]) is not None

    def claim(self, worker: str, now: str, lease_until: str) -> tuple[Any, ...] | None:
        return self.one(CLAIM.format(lock=""), [worker, lease_until, now, now])

    def defer_checkpoints(self, backstop_pages: int) -> None:
        self.conn.execute(f"PRAGMA wal_autocheckpoint = {int(backstop_pages)}")

    def checkpoint(self) -> None:
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def sibling(self) -> SqliteBackend:
        """A second connection to the same file, for another thread."""
        return SqliteBackend(self.path)

    def close(self) -> None:
        self.conn.close()


class PostgresBackend:
    dialect = "postgresql"

    def __init__(self, url: str, min_size: int = 1, max_size: int = 4, timeout: float = 10.0) -> None:
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool, PoolTimeout

        self.url = url
        try:  # one plain connection first: a wrong host or role fails now, with PostgreSQL's own reason
            psycopg.connect(url, connect_timeout=int(timeout)).close()
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL at {redact(url)}: {first_line(exc)}") from None
        self.integrity_error = psycopg.IntegrityError
        self.error = psycopg.Error
        self._dict_row = dict_row
        self._local = threading.local()
        self.pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True},  # one statement, one round trip; transaction() adds BEGIN/COMMIT
            timeout=timeout,
            open=False,
            name="recon",
        )
        try:
            self.pool.open(wait=True, timeout=timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            self.pool.close()
            raise DatabaseError(f"cannot connect to PostgreSQL at {redact(url)}: {first_line(exc)}") from None

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        held = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        with self.pool.connection() as conn:
            yield conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._connection() as conn:
            return conn.execute(pg(sql), params).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._connection() as conn, conn.cursor() as cursor:
            cursor.executemany(pg(sql), rows)

    def insert_many(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Insert many rows with COPY (`table` and `columns` are the store's own names)."""
        with self._connection() as conn, conn.cursor() as cursor:
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._connection() as conn, conn.cursor(row_factory=self._dict_row) as cursor:
            return cursor.execute(pg(sql), params).fetchall()

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._connection() as conn:
            return conn.execute(pg(sql), params).fetchone()

    def tuples(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return conn.execute(pg(sql), params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:
            yield  # nested: part of the outer transaction
            return
        with self.pool.connection() as conn:
            self._local.conn = conn
            try:
                with conn.transaction():
                    yield
            finally:
                self._local.conn = None

    @contextmanager
    def migration_lock(self) -> Iterator[None]:
        with self.transaction():  # DDL is transactional here: a migration lands whole or not at all
            self.execute("SELECT pg_advisory_xact_lock(?)", [MIGRATION_LOCK])
            yield

    def has_table(self, name: str) -> bool:
        return self.one("SELECT to_regclass(?) IS NOT NULL", [name])[0]  # type: ignore[index]

    def claim(self, worker: str, now: str, lease_until: str) -> tuple[Any, ...] | None:
        # SKIP LOCKED: a row another worker is claiming right now is passed over, not waited for.
        return self.one(CLAIM.format(lock=" FOR UPDATE SKIP LOCKED"), [worker, lease_until, now, now])

    def defer_checkpoints(self, backstop_pages: int) -> None:
        """PostgreSQL checkpoints by itself, off the request path."""

    def checkpoint(self) -> None:
        """PostgreSQL checkpoints by itself."""

    def sibling(self) -> PostgresBackend:
        """The pool serves every thread: the same backend."""
        return self

    def close(self) -> None:
        self.pool.close()


Backend = SqliteBackend | PostgresBackend


def open_backend(url: str) -> Backend:
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(url)
    if url.startswith("sqlite:///"):
        return SqliteBackend(url[len("sqlite:///") :] or ":memory:")
    raise DatabaseError(
        f"RECON_DATABASE_URL: expected sqlite:///path or postgresql://... (got {url.split(':')[0]}:...)"
    )


@lru_cache(maxsize=512)
def pg(sql: str) -> str:
    """A query written with `?` placeholders, in psycopg's `%s` style."""
    return sql.replace("%", "%%").replace("?", "%s")


def redact(url: str) -> str:
    """The URL without its password (for messages)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest.split("/", 1)[0]:
        credentials, host = rest.split("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}{sep}{user}@{host}" if user else f"{scheme}{sep}{host}"
    return url


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
