"""The store: immutable runs keyed by their inputs, one transaction each, and the read API."""

from __future__ import annotations

import sqlite3

import pytest

from bot.app import create_app
from bot.config import Settings
from bot.store import SCHEMA_VERSION, Store, StoreError
from tests.book import event, line, metered, reconcile_book, write_book


def stored_book(tmp_path, store, lines=None):
    write_book(tmp_path, [event("e1", 130_000)], [metered(130_000)], lines or [line(110, "120.00")])
    return reconcile_book(tmp_path, "2026-10", store)


def test_a_rerun_over_the_same_inputs_adds_nothing(tmp_path, store):
    first = stored_book(tmp_path, store)
    second = reconcile_book(tmp_path, "2026-10", store)
    assert first == second
    assert (store.db["runs"].count, store.db["run_lines"].count, store.db["discrepancies"].count) == (1, 1, 1)


def test_changed_inputs_make_a_new_run_and_move_the_discrepancy(tmp_path, store):
    first = stored_book(tmp_path, store)
    write_book(tmp_path, [event("e1", 130_000)], [metered(130_000)], [line(120, "140.00")])
    second = reconcile_book(tmp_path, "2026-10", store)
    assert first["run_id"] != second["run_id"]
    assert store.db["runs"].count == 2
    (row,) = store.discrepancies()
    assert (row["first_run_id"], row["last_run_id"], row["delta_amount"]) == (
        first["run_id"],
        second["run_id"],
        "20.00",
    )


def test_stored_report_reads_back_as_written(tmp_path, store):
    report = stored_book(tmp_path, store)
    assert store.get_run(report["run_id"])["lines"] == report["lines"]
    assert store.get_run("run_missing") is None


def test_a_failed_write_leaves_no_half_run(tmp_path, store):
    write_book(tmp_path, [event("e1", 130_000)], [metered(130_000)], [line(110, "120.00")])
    store.db.execute(
        "CREATE TRIGGER no_lines BEFORE INSERT ON discrepancies BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    with pytest.raises(sqlite3.IntegrityError):
        reconcile_book(tmp_path, "2026-10", store)
    assert (store.db["runs"].count, store.db["run_lines"].count) == (0, 0)


def test_migrate_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert Store.open(url).schema_version() == SCHEMA_VERSION
    assert Store.open(url).migrate() == SCHEMA_VERSION


def test_only_sqlite_urls_for_now():
    with pytest.raises(StoreError, match="RECON_DATABASE_URL"):
        Store.open("mysql://x")


def test_api_lists_and_serves_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'api.db'}"
    report = stored_book(tmp_path, Store.open(url))
    client = create_app(Settings(database_url=url)).test_client()
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    runs = client.get("/api/runs?period=2026-10&customer_id=cus_a").json["runs"]
    assert [(r["run_id"], r["status"], r["period"]) for r in runs] == [(report["run_id"], "done", "2026-10")]
    assert client.get("/api/runs?customer_id=cus_zzz").json == {"runs": []}
    assert client.get("/api/runs?status=failed").json == {"runs": []}
    served = client.get(f"/api/runs/{report['run_id']}").json
    assert served["lines"] == report["lines"]
    assert client.get("/api/runs/run_nope").status_code == 404
