"""Several worker processes on one inbox (SQLite and PostgreSQL): each event processed once,
and an event held by a worker killed with SIGKILL is reclaimed when its lease runs out.

The workers are real processes (`tests/worker_process.py`, the real worker loop and store);
the test synchronises on files they write and on the database, with bounded polling waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from bot.service import event_run_id
from bot.signatures import InboundEvent
from bot.store import Store

ROOT = Path(__file__).resolve().parents[1]
LEASE_SECONDS = "1"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Check `condition` (the other processes' state in the database or a file) until it holds;
    fail naming `what` after `timeout` seconds."""
    checking = Retrying(
        retry=retry_if_result(lambda held: not held), wait=wait_fixed(0.02), stop=stop_after_delay(timeout)
    )
    try:
        checking(condition)
    except RetryError:
        pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


class Workers:
    def __init__(self, url: str, logs: Path) -> None:
        self.url, self.logs = url, logs
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "tests.worker_process", self.url, name, LEASE_SECONDS, str(self.logs)]
        with (self.logs / f"{name}.err").open("w") as errors:
            process = subprocess.Popen(command, cwd=ROOT, stderr=errors)
        self.processes[name] = process
        wait_for(lambda: (self.logs / f"ready-{name}").exists() or process.poll() is not None, f"{name} to start")
        assert process.poll() is None, (self.logs / f"{name}.err").read_text()
        return process

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def lines(self, log: str) -> list[tuple[str, str]]:
        path = self.logs / log
        return [tuple(line.split()[1:3]) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def workers(database_url, tmp_path) -> Iterator[Workers]:
    logs = tmp_path / "logs"
    logs.mkdir()
    group = Workers(database_url, logs)
    try:
        yield group
    finally:
        group.stop_all()


def enqueue(store: Store, ids: list[str], body: str = "{}") -> None:
    for event_id in ids:
        assert store.save_event(InboundEvent("test", event_id, "job", None, body, None))


def done(store: Store) -> int:
    return len(store.events("done"))


def test_two_workers_process_every_event_exactly_once(store, workers):
    workers.start("w1")
    workers.start("w2")
    ids = [f"evt_{n:04d}" for n in range(200)]

    enqueue(store, ids)

    wait_for(lambda: done(store) == len(ids), "every event to be done")
    workers.stop_all()
    finished = Counter(event_id for event_id, _ in workers.lines("finished.log"))
    assert finished == Counter(ids)  # each event's work done once, by one worker or the other
    assert Counter(event_id for event_id, _ in workers.lines("started.log")) == Counter(ids)
    assert store.count("runs") == len(ids)
    assert {r["status"] for r in store.list_runs({}, limit=1000)} == {"done"}
    assert {(r["status"], r["attempts"]) for r in store.events()} == {("done", 1)}


def test_an_event_held_by_a_killed_worker_is_reclaimed_and_done_once(store, workers, tmp_path):
    doomed = workers.start("doomed")
    enqueue(store, ["evt_hang"], body="hang")
    wait_for(lambda: (tmp_path / "logs" / "hanging-doomed").exists(), "the first worker to take the event")
    workers.start("survivor")
    others = [f"evt_{n:03d}" for n in range(20)]
    enqueue(store, others)
    wait_for(lambda: done(store) == len(others), "the survivor to do the other events")
    (held,) = store.events("processing")
    assert (held["event_id"], held["worker"]) == ("evt_hang", "doomed")  # its heartbeat kept the lease

    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()

    wait_for(lambda: done(store) == len(others) + 1, "the killed worker's event to be reclaimed")
    (hang,) = [r for r in store.events() if r["event_id"] == "evt_hang"]
    assert (hang["status"], hang["attempts"], hang["worker"]) == ("done", 2, "survivor")
    assert workers.lines("finished.log").count(("evt_hang", "survivor")) == 1
    assert [w for e, w in workers.lines("finished.log") if e == "evt_hang"] == ["survivor"]
    assert store.run_status(event_run_id("test", "evt_hang")) == "done"
    assert store.count("runs") == len(others) + 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_claim_passes_over_an_event_another_worker_is_claiming(store):
    """PostgreSQL: a row locked by another claim in flight is skipped, never waited for
    (SQLite has one writer at a time, so the question does not arise there)."""
    import psycopg

    enqueue(store, ["evt_1", "evt_2"])
    now = datetime.now(UTC) + timedelta(seconds=1)
    impatient = Store.open(store.url.replace("options=", "options=-clock_timeout%3D5000%20"))  # no waiting forever
    with psycopg.connect(store.url) as other:
        other.execute("SELECT 1 FROM inbox WHERE event_id = 'evt_1' FOR UPDATE")  # a claim in flight

        claimed = impatient.claim("w2", now, timedelta(seconds=30))

        assert claimed is not None and claimed.event_id == "evt_2"
    assert impatient.claim("w1", now, timedelta(seconds=30)).event_id == "evt_1"
    assert impatient.claim("w3", now, timedelta(seconds=30)) is None
