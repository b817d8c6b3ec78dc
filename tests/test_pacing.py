"""The platforms' rate budget: a Pace keeps requests under N per second, shared through Redis."""

from __future__ import annotations

import uuid

import limits.storage.memory
import pytest
import redis

from connectors import pacing
from connectors.pacing import Pace
from tests.stripe_fake import INVOICE, METERED, NOV, OCT, billing, line, serve_invoice, serve_summaries

REDIS_URL = "redis://127.0.0.1:6379"


class Clock:
    """Time that moves only when the pace sleeps (patched into the limiter's storage)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(limits.storage.memory, "time", fake)
    monkeypatch.setattr(pacing, "time", fake)
    return fake


def test_requests_within_the_limit_do_not_wait(clock: Clock) -> None:
    pace = Pace(3, "stripe:acct", sleep=clock.sleep)
    assert [pace.wait() for _ in range(3)] == [0, 0, 0]
    assert clock.slept == []


def test_a_request_over_the_limit_waits_for_the_window_to_move(clock: Clock) -> None:
    pace = Pace(3, "stripe:acct", sleep=clock.sleep)
    for _ in range(3):
        pace.wait()
    clock.now += 0.25
    assert pace.wait() > 0
    # the fourth request went out only once the first had left the one-second window
    assert clock.now >= 1_800_000_001.0
    assert sum(clock.slept) == pytest.approx(0.75, abs=0.01)


def test_ten_requests_at_two_per_second_take_four_seconds_of_waiting(clock: Clock) -> None:
    pace = Pace(2, "orb:acct", sleep=clock.sleep)
    start = clock.now
    for _ in range(10):
        pace.wait()
    assert clock.now - start == pytest.approx(4.0, abs=0.01)


def test_accounts_have_their_own_budgets(clock: Clock) -> None:
    storage = f"memory://{uuid.uuid4().hex}"
    first, second = Pace(1, "stripe:a", storage, clock.sleep), Pace(1, "stripe:b", storage, clock.sleep)
    assert first.wait() == 0
    assert second.wait() == 0


def test_processes_sharing_redis_share_one_budget() -> None:
    """Two paces (as in two worker processes) on one Redis: the second finds the budget spent."""
    key = f"stripe:test-{uuid.uuid4().hex}"

    class Spent(Exception):
        pass

    def refuse_to_wait(seconds: float) -> None:
        raise Spent(seconds)

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not running at {REDIS_URL} (.ci/run starts it)")
    mine, theirs = Pace(2, key, REDIS_URL, refuse_to_wait), Pace(2, key, REDIS_URL, refuse_to_wait)
    mine.wait()
    mine.wait()
    with pytest.raises(Spent):
        theirs.wait()


def test_the_stripe_connector_paces_every_request(stripe_api, clock: Clock) -> None:
    pace = Pace(1, "stripe:acct", sleep=clock.sleep)
    serve_invoice(stripe_api, [line("il_1", "price_api")])
    serve_summaries(stripe_api, "mtr_api", OCT, NOV, [500])
    serve_summaries(stripe_api, "mtr_storage", OCT, NOV, [])
    start = clock.now
    billing(METERED, pace=pace).invoice_records(INVOICE)
    requests_made = len(stripe_api.calls)
    assert requests_made >= 3
    # one request a second: every request after the first waited for its turn
    assert clock.now - start == pytest.approx(requests_made - 1, abs=0.01)
