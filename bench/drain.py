"""Inbox drain benchmark: one worker process against two, on PostgreSQL, each against its floor.

    .venv/bin/python bench/drain.py --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/drain.py --database-url ... --events 2000 --repeat 1    # a smoke run

What it measures is the worker machinery (claim with FOR UPDATE SKIP LOCKED and a lease,
the lease heartbeat thread, finish), not a platform: every event runs the same fixed
handler, standing for the real one's work without any network:

- CPU: the event body (the Stripe `invoice.created` fixture, ~4 KB) parsed with
  `parse_float=Decimal`, then SHA-256 chained `--hash-rounds` times over it (about 2 ms
  here, the order of a small reconciliation's CPU);
- database: the run written through the real store exactly as an invoice event's run is
  (`start_run`, then `save_run` with three report lines, one of them a discrepancy).

Each phase starts with a fresh schema holding `--events` stored events (default 10,000),
starts its processes, lets them open the store, then releases them at once and times
until the last one exits:

- workers N (N = 1, 2): N `Worker` processes, each looping `run_once()` until nothing is
  ready (the product's claim, heartbeat and finish around the handler);
- floor N: N processes running the same handler over a fixed share of the events, read
  beforehand (no claim, no lease, no finish): the least the work itself costs.

Phases alternate (floor 1, workers 1, floor 2, workers 2) `--repeat` times; medians are
quoted. Afterwards every phase's runs are counted: each event must make exactly one run
and end `done`. The host is noisy (2 cores, shared with PostgreSQL and anything else
running); compare only figures from one run of this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bot.service import event_run_id  # noqa: E402
from bot.signatures import InboundEvent  # noqa: E402
from bot.store import Claimed, RunRecord, Store  # noqa: E402
from bot.worker import Outcome, Worker  # noqa: E402
from rules.report import stored_from_json  # noqa: E402

FIXTURE = ROOT.parent / "shared" / "fixtures" / "stripe" / "event_invoice_created.json"
TARGET_RATIO = 1.6


# -- the handler: fixed CPU and database work -------------------------------------------------


def report_lines(event_id: str) -> list[dict]:
    def line(meter: str, klass: str, delta: str) -> dict:
        return {
            "customer_id": f"cus_{event_id[-6:]}",
            "meter": meter,
            "period": "2026-10",
            "class": klass,
            "delta_amount": delta,
            "currency": "usd",
            "break_at": "none" if klass == "match" else "billing",
            "cause": "bench",
            "late_units": "0",
            "evidence": {"clears": [], "invoice_ids": ["in_bench"]},
        }

    return [line("api_calls", "match", "0.00"), line("storage", "match", "0.00"), line("seats", "under_bill", "12.00")]


def work(store: Store, provider: str, event_id: str, body: str, rounds: int) -> str:
    event = json.loads(body, parse_float=Decimal)
    digest = json.dumps(event["data"]["object"]["id"]).encode() + body.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest() + digest[:64]
    run_id = event_run_id(provider, event_id)
    record = RunRecord(run_id, "2026-10-01", "2026-11-01", "2026-10", "bench", "1", {"event": event_id}, [])
    store.start_run(record)
    store.save_run(record, {"keys": 3, "digest": digest[:8].hex()}, stored_from_json(report_lines(event_id)))
    return run_id


# -- the processes ------------------------------------------------------------------------------


def worker_process(url: str, name: str, rounds: int, ready, go) -> None:  # type: ignore[no-untyped-def]
    store = Store.open(url)

    def handler(claimed: Claimed) -> Outcome:
        return Outcome("done", work(store, claimed.provider, claimed.event_id, claimed.body, rounds))

    worker = Worker(store, {("stripe", "invoice.created"): handler}, name=name, renewer=store.sibling)
    ready.release()
    go.wait()
    while worker.run_once():
        pass
    store.close()


def floor_process(url: str, share: int, shares: int, rounds: int, ready, go) -> None:  # type: ignore[no-untyped-def]
    store = Store.open(url)
    events = [
        (r["provider"], r["event_id"], r["body"])
        for n, r in enumerate(store.backend.query("SELECT provider, event_id, body FROM inbox ORDER BY event_id"))
        if n % shares == share
    ]
    ready.release()
    go.wait()
    for provider, event_id, body in events:
        work(store, provider, event_id, body, rounds)
    store.close()


# -- one phase ----------------------------------------------------------------------------------


def schema_url(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def fill(url: str, count: int) -> None:
    template = json.loads(FIXTURE.read_text())
    template["type"] = "invoice.created"
    store = Store.open(url)
    rows = []
    for n in range(count):
        template["id"] = f"evt_drain_{n:07d}"
        rows.append(InboundEvent("stripe", template["id"], "invoice.created", None, json.dumps(template), "in_x"))
    with store.backend.transaction():
        for event in rows:
            store.save_event(event)
    store.backend.execute("ANALYZE inbox")
    store.close()


def phase(base_url: str, kind: str, processes: int, args: argparse.Namespace) -> dict:
    schema = f"bench_drain_{os.getpid()}_{kind}{processes}"
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.execute(f"CREATE SCHEMA {schema}")
    url = schema_url(base_url, schema)
    try:
        fill(url, args.events)
        ready, go = mp.Semaphore(0), mp.Event()
        if kind == "workers":
            targets = [(worker_process, (url, f"w{n}", args.hash_rounds, ready, go)) for n in range(processes)]
        else:
            targets = [(floor_process, (url, n, processes, args.hash_rounds, ready, go)) for n in range(processes)]
        children = [mp.Process(target=t, args=a) for t, a in targets]
        for child in children:
            child.start()
        for _ in children:
            ready.acquire()
        began = time.perf_counter()
        go.set()
        for child in children:
            child.join()
        elapsed = time.perf_counter() - began
        if any(child.exitcode for child in children):
            raise SystemExit(f"{kind} {processes}: a process failed ({[c.exitcode for c in children]})")
        return {"kind": kind, "processes": processes, "elapsed": elapsed, **check(url, kind, args.events)}
    finally:
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def check(url: str, kind: str, count: int) -> dict:
    store = Store.open(url)
    try:
        runs = store.count("runs")
        done_runs = store.backend.one("SELECT count(*) FROM runs WHERE status = 'done'")[0]
        events_done = len(store.events("done")) if kind == "workers" else count
        twice = store.backend.one("SELECT count(*) FROM inbox WHERE attempts > 1")[0]
    finally:
        store.close()
    return {"runs": runs, "runs_done": done_runs, "events_done": events_done, "claimed_twice": twice}


# -- the report ---------------------------------------------------------------------------------


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load avg {load}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--hash-rounds", type=int, default=4000, help="the handler's CPU work")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    results: list[dict] = []
    for attempt in range(args.repeat):
        for kind, processes in (("floor", 1), ("workers", 1), ("floor", 2), ("workers", 2)):
            result = phase(args.database_url, kind, processes, args)
            results.append(result)
            rate = args.events / result["elapsed"]
            print(
                f"# {attempt + 1}: {kind:7} {processes}: {result['elapsed']:6.2f} s {rate:6.0f} events/s "
                f"runs {result['runs']} done {result['runs_done']} events done {result['events_done']} "
                f"claimed twice {result['claimed_twice']}",
                file=sys.stderr,
            )

    def median(kind: str, processes: int) -> float:
        return statistics.median(r["elapsed"] for r in results if (r["kind"], r["processes"]) == (kind, processes))

    rows = [
        "| phase | processes | median s | events/s | runs (each done) | events done |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for kind, processes in (("floor", 1), ("workers", 1), ("floor", 2), ("workers", 2)):
        elapsed = median(kind, processes)
        last = [r for r in results if (r["kind"], r["processes"]) == (kind, processes)][-1]
        rows.append(
            f"| {kind} | {processes} | {elapsed:.2f} | {args.events / elapsed:.0f} | "
            f"{last['runs']} ({last['runs_done']}) | {last['events_done']} |"
        )
    ratio = median("workers", 1) / median("workers", 2)
    floor_ratio = median("floor", 1) / median("floor", 2)
    share1 = 100 * median("floor", 1) / median("workers", 1)
    share2 = 100 * median("floor", 2) / median("workers", 2)
    intact = all(
        r["runs"] == r["runs_done"] == args.events and r["events_done"] == args.events and r["claimed_twice"] == 0
        for r in results
    )
    print(f"## Inbox drain benchmark (PostgreSQL, {args.events} events, {args.repeat} runs)\n\n{machine()}\n")
    print("\n".join(rows))
    print(
        f"\n| check | figure | target | verdict |\n|---|---|---|---|\n"
        f"| two workers / one worker | {ratio:.2f}× (the floor's own: {floor_ratio:.2f}×) | ≥ {TARGET_RATIO}× | "
        f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'} |\n"
        f"| floor / workers time | 1 process {share1:.0f}%, 2 processes {share2:.0f}% | | |\n"
        f"| every event done once, one done run each, none claimed twice | {'yes' if intact else 'NO'} | yes | "
        f"{'PASS' if intact else 'FAIL'} |"
    )
    return 0 if ratio >= TARGET_RATIO and intact else 1


if __name__ == "__main__":
    sys.exit(main())
