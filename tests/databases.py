"""The two databases every store test runs against: a SQLite file, and a fresh PostgreSQL schema.

PostgreSQL is the one at 127.0.0.1:5432 (trust auth, database `test`; CI starts it),
or `TEST_POSTGRES_URL`. Each test gets its own schema, dropped afterwards. A PostgreSQL
that cannot be reached fails those tests (it never skips them) with a message saying so.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BACKENDS = ("sqlite", "postgresql")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def admin_connection():  # type: ignore[no-untyped-def]
    import psycopg

    try:
        return psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    pytest.fail(
        f"PostgreSQL is not reachable at {POSTGRES_URL} ({reason}). The store tests run against it too: start it "
        "(`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, as .ci/run does) "
        "or point TEST_POSTGRES_URL at one.",
        pytrace=False,
    )


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty database of this kind, gone afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with admin_connection() as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(POSTGRES_URL, schema)
    finally:
        with admin_connection() as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
