"""The period close: the worker reconciles every customer of a closed period by itself, once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from bot.cli import main
from bot.handlers import Context, all_handlers
from bot.schedule import close_due, enqueue_close, schedule_handlers
from bot.store import Store
from bot.worker import Worker
from rules.config import ConfigError, parse_config
from rules.periods import last_closed, parse_periods
from tests.book import config_text, event, line, metered, write_book

UTC_ZONE = ZoneInfo("UTC")


@pytest.mark.parametrize(
    ("now", "zone", "closed"),
    [
        ("2026-11-04T00:00:00+00:00", "UTC", "2026-10"),  # exactly 72 h after October's end
        ("2026-11-03T23:59:59+00:00", "UTC", "2026-09"),  # a second too early for October
        ("2026-12-25T12:00:00+00:00", "UTC", "2026-11"),
        ("2027-01-04T04:59:59+00:00", "America/New_York", "2026-11"),  # Jan 1 is 05:00 UTC there
        ("2027-01-04T05:00:00+00:00", "America/New_York", "2026-12"),
    ],
)
def test_the_latest_closed_period(now, zone, closed):
    assert last_closed(datetime.fromisoformat(now), ZoneInfo(zone), timedelta(hours=72)).label == closed


def test_schedule_config():
    assert parse_config(config_text()).schedule is None
    assert parse_config(config_text() + "[schedule]\n").schedule.close_after == timedelta(hours=72)
    assert parse_config(config_text() + '[schedule]\nclose_after = "4d"\n').schedule.close_after == timedelta(days=4)
    with pytest.raises(ConfigError, match="schedule.close_after: must be at least period.grace"):
        parse_config(config_text() + '[schedule]\nclose_after = "24h"\n')
    # when the close runs is not part of how a run is calculated
    assert parse_config(config_text()).fingerprint == parse_config(config_text() + "[schedule]\n").fingerprint


@pytest.fixture
def book(tmp_path) -> Context:
    """cus_a is billed right; cus_b used 90,000 calls (90 units, 40 over) and has no invoice at all."""
    path = write_book(
        tmp_path,
        [event("a1", 100_000), event("b1", 90_000, customer="cus_b")],
        [metered(100_000), metered(90_000, customer="cus_b")],
        [line(100, "100.00")],
        config=config_text() + "[schedule]\n",
    )
    config = parse_config(path.read_text())
    return Context(config, path, Store.open(f"sqlite:///{tmp_path / 'close.db'}"), {})


def worker(context: Context) -> Worker:
    return Worker(context.store, all_handlers(context) | schedule_handlers(context))


def test_an_idle_worker_closes_the_period_once_and_finds_the_customer_with_no_invoice(book):
    clock = datetime(2026, 11, 5, 6, 0, tzinfo=UTC)
    tick = close_due(book, every=0, clock=lambda: clock)
    tick()
    tick()  # asked twice: one close
    job = worker(book)
    assert job.run_once()
    assert not job.run_once()

    [close] = book.store.events()
    assert (close["event_id"], close["status"]) == ("close_2026-10", "done")
    run = book.store.get_run(close["run_id"])
    by_customer = {ln["customer_id"]: ln for ln in run["lines"]}
    assert by_customer["cus_a"]["class"] == "match"
    assert by_customer["cus_b"]["class"] == "under_bill"
    assert by_customer["cus_b"]["delta_amount"] == "80.00"
    assert [r["run_id"] for r in book.store.list_runs({})] == [close["run_id"]]


def test_no_close_before_the_period_has_settled(book):
    close_due(book, every=0, clock=lambda: datetime(2026, 11, 2, tzinfo=UTC))()
    assert [e["event_id"] for e in book.store.events()] == ["close_2026-09"]


def test_a_close_redone_after_a_crash_makes_the_same_run(book):
    period = parse_periods("2026-10", UTC_ZONE)[0]
    assert enqueue_close(book.store, period)
    assert not enqueue_close(book.store, period)
    job = worker(book)
    job.run_once()
    first = book.store.events()[0]["run_id"]
    assert book.store.replay(["close_2026-10"]) == 1
    job.run_once()
    assert book.store.events()[0]["run_id"] == first
    assert len(book.store.list_runs({})) == 1


def test_recon_close_queues_the_period(tmp_path, monkeypatch):
    path = write_book(tmp_path, [event("a1", 100_000)], [metered(100_000)], [line(100, "100.00")])
    monkeypatch.setenv("RECON_CONFIG", str(path))
    first = CliRunner().invoke(main, ["close", "--period", "2026-10"])
    again = CliRunner().invoke(main, ["close", "--period", "2026-10"])
    assert first.exit_code == 0 and "2026-10: close queued" in first.output
    assert "already queued or done" in again.output
    bad = CliRunner().invoke(main, ["close", "--period", "2026-09..2026-10"])
    assert bad.exit_code == 2 and "one month at a time" in bad.output
