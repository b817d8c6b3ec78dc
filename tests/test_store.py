"""The store: immutable runs keyed by their inputs, one transaction each, and the read API."""

from __future__ import annotations

import json

import pytest

from bot import render
from bot.app import create_app
from bot.config import Settings
from bot.migrations import SCHEMA_VERSION
from bot.store import RunRecord, Store, StoreError
from tests.book import SEP, event, line, metered, reconcile_book, write_book


def stored_book(tmp_path, store, lines=None):
    write_book(tmp_path, [event("e1", 130_000)], [metered(130_000)], lines or [line(110, "120.00")])
    return reconcile_book(tmp_path, "2026-10", store)


def test_a_rerun_over_the_same_inputs_adds_nothing(tmp_path, store):
    first = stored_book(tmp_path, store)
    second = reconcile_book(tmp_path, "2026-10", store)
    assert first == second
    assert (store.count("runs"), store.count("run_customers"), store.count("discrepancies")) == (1, 1, 1)


def test_changed_inputs_make_a_new_run_and_move_the_discrepancy(tmp_path, store):
    first = stored_book(tmp_path, store)
    write_book(tmp_path, [event("e1", 130_000)], [metered(130_000)], [line(120, "140.00")])
    second = reconcile_book(tmp_path, "2026-10", store)
    assert first["run_id"] != second["run_id"]
    assert store.count("runs") == 2
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


def test_a_runs_lines_are_kept_in_pages_and_read_back_in_order(tmp_path, store):
    store.lines_per_page = 2
    customers = [f"cus_{n}" for n in range(5)]
    write_book(
        tmp_path,
        [event(f"e{n}", 1_000 * (n + 1), customer=c) for n, c in enumerate(customers)],
        [metered(1_000 * (n + 1) + (500 if n in (1, 4) else 0), customer=c) for n, c in enumerate(customers)],
        [line(n + 1, "0.00", customer=c) for n, c in enumerate(customers)],
    )
    report = reconcile_book(tmp_path, "2026-10", store)
    run_id = report["run_id"]
    assert store.count("run_pages") == 3  # 2, 2 and 1 lines
    assert [json.loads(t) for t in store.line_texts(run_id)] == report["lines"]
    assert [ln["customer_id"] for ln in report["lines"]] == customers
    breaks = [json.loads(t) for t in store.line_texts(run_id, breaks_only=True)]  # pages 1 and 3
    assert [ln["customer_id"] for ln in breaks] == ["cus_1", "cus_4"]
    assert breaks == [ln for ln in report["lines"] if ln["class"] != "match"]
    assert store.latest_line("cus_4", "api_calls", "2026-10") == (run_id, report["lines"][4])
    assert [ln["customer_id"] for ln in store.period_lines("2026-10")] == customers
    head = store.run_head(run_id)
    by_block, by_line = (
        render.json_pieces(head, lines) for lines in (store.line_blocks(run_id), store.line_texts(run_id))
    )
    assert "".join(by_block) == "".join(by_line)  # a page at a time writes what a line at a time does
    assert json.loads("".join(render.json_pieces(head, store.line_blocks(run_id))))["lines"] == report["lines"]
    assert list(store.line_texts("run_missing")) == []


def two_month_book(tmp_path):
    """Three customers over September and October; cus_b has four lines (two meters, one of
    them unmapped, in each month), so in pages of two its lines cross two page boundaries."""
    sep = "2026-09-10T12:00:00Z"
    write_book(
        tmp_path,
        [
            event("e1", 130_000, customer="cus_a"),
            event("e2", 70_000, timestamp=sep, customer="cus_b"),
            event("e3", 90_000, customer="cus_b"),
            event("e4", 5, customer="cus_b", meter="bogus"),
            event("e6", 5, timestamp=sep, customer="cus_b", meter="bogus"),
            event("e5", 60_000, customer="cus_c"),
        ],
        [
            metered(130_000, customer="cus_a"),
            metered(70_000, customer="cus_b", span=SEP),
            metered(95_000, customer="cus_b"),
            metered(60_000, customer="cus_c"),
        ],
        [
            line(110, "120.00", customer="cus_a"),
            line(70, "40.00", customer="cus_b", span=SEP),
            line(90, "80.00", customer="cus_b"),
            line(60, "20.00", customer="cus_c"),
        ],
    )


def assert_every_lookup_reads_the_report(store, report):
    """Each of the store's lookups finds what the report says, line by line."""
    run_id, lines = report["run_id"], report["lines"]
    assert [json.loads(t) for t in store.line_texts(run_id)] == lines
    breaks = [json.loads(t) for t in store.line_texts(run_id, breaks_only=True)]
    assert breaks == [ln for ln in lines if ln["class"] != "match"] != []
    for ln in lines:
        assert store.latest_line(ln["customer_id"], ln["meter"], ln["period"]) == (run_id, ln)
        assert [r["run_id"] for r in store.list_runs({"customer_id": ln["customer_id"]})] == [run_id]
    for period in {ln["period"] for ln in lines}:
        assert store.period_lines(period) == [ln for ln in lines if ln["period"] == period]
    assert store.latest_line("cus_b", "api_calls", "2026-08") is None
    assert store.latest_line("cus_zzz", "api_calls", "2026-10") is None
    assert store.list_runs({"customer_id": "cus_bb"}) == []


def test_every_line_is_found_by_key_across_page_boundaries(tmp_path, store):
    store.lines_per_page = 2
    two_month_book(tmp_path)
    report = reconcile_book(tmp_path, "2026-09..2026-10", store)
    assert [ln["customer_id"] for ln in report["lines"]] == ["cus_a", *["cus_b"] * 4, "cus_c"]
    assert store.count("run_pages") == 3 and store.count("run_customers") == 3
    assert_every_lookup_reads_the_report(store, report)

    october = reconcile_book(tmp_path, "2026-10", store)  # newer, and without September's keys
    for ln in report["lines"]:
        newest = october if ln["period"] == "2026-10" else report
        found = store.latest_line(ln["customer_id"], ln["meter"], ln["period"])
        assert found is not None and found[0] == newest["run_id"]
    assert store.period_lines("2026-09") == [ln for ln in report["lines"] if ln["period"] == "2026-09"]
    assert store.period_lines("2026-10") == october["lines"]
    runs = [r["run_id"] for r in store.list_runs({"customer_id": "cus_b"})]
    assert runs == [october["run_id"], report["run_id"]]
    by_period = {p: [r["run_id"] for r in store.list_runs({"period": p})] for p in ("2026-08", "2026-09", "2026-10")}
    assert by_period == {"2026-08": [], "2026-09": [report["run_id"]], "2026-10": runs}  # two months: under each
    for other in ("2026-09-15..2026-10-15", "2026_09", "2026-0%"):  # not a month: only its own runs
        assert store.list_runs({"period": other}) == []
    dated = reconcile_book(tmp_path, "2026-10-01..2026-11-01", store)  # October spelled as dates
    assert dated == october and store.count("runs") == 2


def test_lookups_hold_for_uneven_pages_and_a_customer_in_two_places(store):
    """DuckDB hands the bulk path's pages over in uneven batches; and nothing in the store
    needs a customer's lines together. cus_b's lines stand in two places, in pages of 1, 3 and 2."""
    from rules.report import StoredPage, StoredPages, line_text

    keys = [("cus_a", "m1", "match"), ("cus_b", "m1", "under_bill"), ("cus_b", "m2", "match"),
            ("cus_c", "m1", "timing"), ("cus_b", "m3", "over_bill"), ("cus_d", "m1", "match")]  # fmt: skip
    lines = [
        {"customer_id": c, "meter": m, "period": "2026-10", "class": k, "n": n, "evidence": {"clears": []}}
        for n, (c, m, k) in enumerate(keys)
    ]
    texts = [line_text(ln) for ln in lines]

    def page(start: int, end: int) -> StoredPage:
        chunk = lines[start:end]
        return StoredPage(
            "\n".join(texts[start:end]).encode(),
            [ln["customer_id"] for ln in chunk],
            [ln["meter"] for ln in chunk],
            [ln["period"] for ln in chunk],
            [ln["class"] for ln in chunk],
            [],
        )

    record = RunRecord("run_uneven", "s", "e", "2026-10", "h", "v", {}, [])
    assert store.save_run(record, {}, StoredPages([page(0, 1), page(1, 4), page(4, 6)]))
    assert store.count("run_customers") == 5  # cus_b twice
    assert [json.loads(t)["n"] for t in store.line_texts("run_uneven", breaks_only=True)] == [1, 3, 4]
    for ln in lines:
        assert store.latest_line(ln["customer_id"], ln["meter"], "2026-10") == ("run_uneven", json.loads(line_text(ln)))
    assert [ln["n"] for ln in store.period_lines("2026-10")] == [0, 1, 2, 4, 3, 5]  # by customer, then meter
    assert [r["run_id"] for r in store.list_runs({"customer_id": "cus_b"})] == ["run_uneven"]


def test_api_streams_a_run_whole_or_its_breaks_only(tmp_path, database_url):
    store = Store.open(database_url)
    write_book(
        tmp_path,
        [event("e_a", 130_000, customer="cus_a"), event("e_b", 100_000, customer="cus_b")],
        [metered(100_000, customer="cus_a"), metered(100_000, customer="cus_b")],
        [line(100, "100.00", customer="cus_a"), line(100, "100.00", customer="cus_b")],
    )
    report = reconcile_book(tmp_path, "2026-10", store)
    client = create_app(Settings(database_url=database_url)).test_client()
    whole = client.get(f"/api/runs/{report['run_id']}")
    assert whole.mimetype == "application/json"
    assert whole.json["lines"] == report["lines"] and whole.json["summary"] == report["summary"]
    breaks = client.get(f"/api/runs/{report['run_id']}?lines=breaks").json["lines"]
    assert [(ln["customer_id"], ln["class"]) for ln in breaks] == [("cus_a", "under_bill")]
    assert [ln["class"] for ln in report["lines"]] == ["under_bill", "match"]


FAILING_TRIGGER = {
    "sqlite": ["CREATE TRIGGER no_lines BEFORE INSERT ON discrepancies BEGIN SELECT RAISE(ABORT, 'disk full'); END"],
    "postgresql": [
        """CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'disk full' USING ERRCODE = 'check_violation'; END $$""",
        "CREATE TRIGGER no_lines BEFORE INSERT ON discrepancies FOR EACH ROW EXECUTE FUNCTION disk_full()",
    ],
}


def test_a_failed_write_leaves_no_half_run(tmp_path, store):
    write_book(tmp_path, [event("e1", 130_000)], [metered(130_000)], [line(110, "120.00")])
    for statement in FAILING_TRIGGER[store.dialect]:
        store.backend.execute(statement)
    with pytest.raises(store.backend.integrity_error, match="disk full"):
        reconcile_book(tmp_path, "2026-10", store)
    assert (store.count("runs"), store.count("run_customers")) == (0, 0)


def test_migrate_is_idempotent(database_url):
    assert Store.open(database_url).schema_version() == SCHEMA_VERSION
    assert Store.open(database_url).migrate() == SCHEMA_VERSION


@pytest.mark.parametrize("old", range(1, SCHEMA_VERSION))
def test_a_database_at_an_older_version_is_brought_forward(database_url, monkeypatch, old):
    from bot import store as store_module

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:old])
        assert Store.open(database_url).schema_version() == old
    store = Store.open(database_url)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.count("schema_version") == SCHEMA_VERSION
    with pytest.raises(store.backend.error, match="inbox_open"):  # version 3 made it
        store.backend.execute("CREATE INDEX inbox_open ON inbox (received_at)")
    assert [store.count(t) for t in ("route_messages", "route_writebacks", "watch_checks")] == [0, 0, 0]
    assert store.watchlist(include_closed=True) == []  # version 4's cycles and escalated_by columns


def test_runs_stored_before_pages_are_moved_into_pages(tmp_path, database_url, monkeypatch):
    from bot import store as store_module
    from rules.report import line_text

    report = stored_book(tmp_path, Store.open("sqlite:///:memory:"))  # the report, to store the old way
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:4])
        old = Store.open(database_url)
        old.backend.execute(
            f"INSERT INTO runs ({store_module.RUN_COLUMNS}) VALUES (?, 'done', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [report["run_id"], "2026-11-01T00:00:00Z", "s", "e", "2026-10", "h", "v", "{}", "[]", None, None, "{}"],
        )
        for position, ln in enumerate(report["lines"]):
            old.backend.execute(
                """INSERT INTO run_lines (run_id, position, customer_id, meter, period, class, line)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [report["run_id"], position, ln["customer_id"], ln["meter"], ln["period"], ln["class"], line_text(ln)],
            )
    store = Store.open(database_url)
    assert store.get_run(report["run_id"])["lines"] == report["lines"]
    assert store.count("run_pages") == 1
    with pytest.raises(store.backend.error):
        store.backend.query("SELECT line FROM run_lines")  # the texts live in the pages only


def test_runs_indexed_line_by_line_in_zlib_pages_are_moved_to_customer_spans(tmp_path, database_url, monkeypatch):
    import zlib

    from bot import store as store_module
    from rules.report import line_text

    two_month_book(tmp_path)
    report = reconcile_book(tmp_path, "2026-09..2026-10", Store.open("sqlite:///:memory:"))
    run_id, lines = report["run_id"], report["lines"]
    with monkeypatch.context() as patch:  # version 6: a run_lines row per line, pages of two
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:6])
        old = Store.open(database_url)
        old.backend.execute(
            f"INSERT INTO runs ({store_module.RUN_COLUMNS}) VALUES (?, 'done', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, "2026-11-02T00:00:00Z", "s", "e", "2026-09..2026-10", "h", "v", "{}", "[]", None, None, "{}"],
        )
        for position, ln in enumerate(lines[:3]):  # from the fourth line on, the pages' own texts are read
            old.backend.execute(
                """INSERT INTO run_lines (run_id, position, customer_id, meter, period, class)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                [run_id, position, ln["customer_id"], ln["meter"], ln["period"], ln["class"]],
            )
        for first in range(0, len(lines), 2):  # compressed with zlib, as pages were then
            text = "\n".join(line_text(ln) for ln in lines[first : first + 2])
            old.backend.execute(
                "INSERT INTO run_pages (run_id, first_position, body) VALUES (?, ?, ?)",
                [run_id, first, zlib.compress(text.encode(), 1)],
            )
    store = Store.open(database_url)
    assert (store.count("run_pages"), store.count("run_customers")) == (3, 3)
    assert_every_lookup_reads_the_report(store, report)
    assert not store.backend.has_table("run_lines")


def test_processes_starting_together_migrate_once(database_url):
    """Each store migrates under a lock: the second finds the schema current."""
    import threading

    results: list[object] = []

    def open_one() -> None:
        try:
            results.append(Store.open(database_url).schema_version())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion
            results.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [SCHEMA_VERSION] * 4


def test_unknown_database_urls_are_refused_naming_the_variable():
    with pytest.raises(StoreError, match="RECON_DATABASE_URL"):
        Store.open("mysql://x")


def test_an_unreachable_postgresql_is_one_line_without_the_password():
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL at postgresql://u@127.0.0.1:1/x") as caught:
        Store.open("postgresql://u:s3cret@127.0.0.1:1/x?connect_timeout=1")
    assert "s3cret" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_api_lists_and_serves_runs(tmp_path, database_url):
    report = stored_book(tmp_path, Store.open(database_url))
    client = create_app(Settings(database_url=database_url)).test_client()
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    runs = client.get("/api/runs?period=2026-10&customer_id=cus_a").json["runs"]
    assert [(r["run_id"], r["status"], r["period"]) for r in runs] == [(report["run_id"], "done", "2026-10")]
    assert client.get("/api/runs?customer_id=cus_zzz").json == {"runs": []}
    assert client.get("/api/runs?status=failed").json == {"runs": []}
    served = client.get(f"/api/runs/{report['run_id']}").json
    assert served["lines"] == report["lines"]
    assert client.get("/api/runs/run_nope").status_code == 404


def test_many_rows_are_inserted_as_given(store):
    store.start_run(RunRecord("run_x", "s", "e", "2026-10", "h", "v", {}, []))
    rows = [("run_x", n, f'cus_"é\\\n{n}', n % 7) for n in range(12_001)]  # three chunks on SQLite
    store.backend.insert_many("run_customers", ("run_id", "first_position", "customer_id", "lines"), rows)
    back = store.backend.tuples(
        "SELECT run_id, first_position, customer_id, lines FROM run_customers ORDER BY first_position"
    )
    assert [tuple(row) for row in back] == rows


def test_pages_are_compressed_in_order():
    from bot.pages import compressed, unpack, unpack_keys
    from rules.report import StoredLine, pages_of

    texts = [f'{{"n":{n},"s":"é\\n"}}' for n in range(29)]
    classes = ["match", "under_bill", "timing"]
    lines = (
        StoredLine(f"cus_{n}\n", "m", f"2026-{n % 12 + 1:02d}", classes[n % 3], text, False)
        for n, text in enumerate(texts)
    )
    pages = list(compressed(pages_of(lines, 3)))  # ten pages, more than are compressed at once
    assert [len(page.classes) for page, _, _ in pages] == [3] * 9 + [2]
    assert [page.customers[0] for page, _, _ in pages] == [f"cus_{n}\n" for n in range(0, 29, 3)]
    assert [text for _, body, _ in pages for text in unpack(body)] == texts
    keys = [unpack_keys(body) for _, _, body in pages]
    assert [c for k in keys for c in k.customers] == [f"cus_{n}\n" for n in range(29)]
    assert [p for k in keys for p in k.periods] == [f"2026-{n % 12 + 1:02d}" for n in range(29)]
    assert [c for k in keys for c in k.classes] == [classes[n % 3] for n in range(29)]
    assert list(keys[1].find(3, 4, 9)) == [(4, "m", "2026-05", "under_bill"), (5, "m", "2026-06", "timing")]
