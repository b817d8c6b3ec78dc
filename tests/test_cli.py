"""`recon` as a user runs it: exit codes, one-line messages, formats, determinism."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from bot.cli import main
from bot.config import Settings
from bot.migrations import SCHEMA_VERSION
from bot.store import Store
from tests.book import config_text, event, line, metered, write_book


def recon(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def book(tmp_path, raw=None):
    return write_book(
        tmp_path,
        raw or [event("e1", 100_000), event("e2", 30_000)],
        [metered(100_000)],
        [line(100, "100.00")],
    )


def test_reconcile_json_is_the_contract_report(tmp_path):
    result = recon("reconcile", "--config", str(book(tmp_path)), "--period", "2026-10", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"run_id", "period", "summary", "lines"}
    assert report["summary"]["classes"]["under_bill"] == {"count": 1, "amount": "60.00", "amounts": {"usd": "60.00"}}
    assert report["lines"][0]["class"] == "under_bill"


def test_same_inputs_give_byte_identical_reports_and_one_stored_run(tmp_path, database_url, monkeypatch):
    monkeypatch.setenv("RECON_DATABASE_URL", database_url)
    config = str(book(tmp_path))
    first = recon("reconcile", "--config", config, "--format", "json")
    second = recon("reconcile", "--config", config, "--format", "json")
    assert first.exit_code == second.exit_code == 0
    assert first.stdout == second.stdout
    store = Store.open(Settings.from_env().database_url)
    assert (store.count("runs"), store.count("run_customers"), store.count("discrepancies")) == (1, 1, 1)


def test_json_report_prints_each_stored_line_on_a_text_line_of_its_own(tmp_path, database_url, monkeypatch):
    monkeypatch.setenv("RECON_DATABASE_URL", database_url)
    customers = ("cus_a", "cus_b", "cus_c")
    config = write_book(
        tmp_path,
        [event(f"e_{c}", 100_000, customer=c) for c in customers],
        [metered(100_000, customer=c) for c in customers],
        [line(100, "100.00", customer=c) for c in customers],
    )
    result = recon("reconcile", "--config", str(config), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    store = Store.open(Settings.from_env().database_url)
    stored = list(store.line_texts(report["run_id"]))
    assert [json.loads(t) for t in stored] == report["lines"] and len(stored) == 3
    shown = result.stdout.split('"lines": [\n', 1)[1].splitlines()
    assert shown == [f"    {t}," for t in stored[:-1]] + [f"    {stored[-1]}", "  ]", "}"]


def five_customers(tmp_path):
    customers = [f"cus_{n}" for n in range(5)]
    return write_book(
        tmp_path,
        [event(f"e_{c}", 100_000 + n * 1_000, customer=c) for n, c in enumerate(customers)],
        [metered(100_000, customer=c) for c in customers],
        [line(100, "100.00", customer=c) for c in customers],
    )


def test_json_written_as_the_run_is_stored_is_the_report_read_back(tmp_path, database_url, monkeypatch):
    # Pages of two lines: five keys make three pages, the last one short. The first run writes
    # its report from the texts as they are stored; the second finds the run stored and reads
    # it back from the store: the same bytes, to stdout and to --out alike.
    monkeypatch.setenv("RECON_DATABASE_URL", database_url)
    monkeypatch.setattr(Store, "lines_per_page", 2)
    config = str(five_customers(tmp_path))
    out = tmp_path / "reports" / "report.json"
    out.parent.mkdir()
    spooled = recon("reconcile", "--config", config, "--format", "json", "--out", str(out))
    assert spooled.exit_code == 0, spooled.output
    read_back = recon("reconcile", "--config", config, "--format", "json")
    assert read_back.exit_code == 0, read_back.output
    assert out.read_text(encoding="utf-8") == read_back.stdout
    assert len(json.loads(read_back.stdout)["lines"]) == 5
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]  # no temporary file left


def test_a_run_that_fails_to_store_writes_no_report(tmp_path, monkeypatch):
    # The store write fails after every line went to the report being written: the run is
    # rolled back, and neither a report nor its temporary file is left.
    monkeypatch.setenv("RECON_DATABASE_URL", f"sqlite:///{tmp_path / 'recon.db'}")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(Store, "_watch", fail)
    out = tmp_path / "reports" / "report.json"
    out.parent.mkdir()
    failed = recon("reconcile", "--config", str(five_customers(tmp_path)), "--format", "json", "--out", str(out))
    assert failed.exit_code == 1 and "disk full" in failed.stderr
    assert list(out.parent.iterdir()) == []
    assert Store.open(Settings.from_env().database_url).count("runs") == 0
    printed = recon("reconcile", "--config", str(five_customers(tmp_path)), "--format", "json")
    assert printed.exit_code == 1 and printed.stdout == ""


def test_out_in_a_missing_folder_exits_2_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RECON_DATABASE_URL", f"sqlite:///{tmp_path / 'recon.db'}")
    out = tmp_path / "nowhere" / "report.json"
    for fmt in ("json", "csv", "table"):
        result = recon("reconcile", "--config", str(book(tmp_path)), "--format", fmt, "--out", str(out))
        assert result.exit_code == 2
        assert result.stderr.strip() == f"recon: --out {out}: no such folder {out.parent}"
    assert Store.open(Settings.from_env().database_url).count("runs") == 0  # nothing was run


def test_the_table_lists_at_most_limit_discrepancies_and_says_how_many_more(tmp_path):
    customers = ("cus_a", "cus_b", "cus_c", "cus_d")
    config = write_book(
        tmp_path,
        [event(f"e_{c}", 130_000 if c != "cus_d" else 100_000, customer=c) for c in customers],
        [metered(100_000, customer=c) for c in customers],
        [line(100, "100.00", customer=c) for c in customers],
    )
    shown = recon("reconcile", "--config", str(config), "--limit", "2").stdout
    assert ("cus_a" in shown, "cus_b" in shown, "cus_c" in shown) == (True, True, False)
    assert "cus_d" not in shown  # a match: not listed without --all
    assert "1 more not shown" in shown
    everything = recon("reconcile", "--config", str(config), "--limit", "0").stdout
    assert "cus_c" in everything and "more not shown" not in everything


def test_csv_and_table_formats(tmp_path):
    config = str(book(tmp_path))
    as_csv = recon("reconcile", "--config", config, "--format", "csv")
    header, row = as_csv.stdout.splitlines()
    assert header.startswith("customer_id,meter,period,")
    assert ",under_bill,metering," in row
    table = recon("reconcile", "--config", config, "--out", str(tmp_path / "report.txt"))
    assert table.exit_code == 0
    shown = (tmp_path / "report.txt").read_text()
    assert "under_bill" in shown
    rows = {line.split()[0]: line.split()[1:] for line in shown.splitlines() if line.strip()[:1].isalpha()}
    assert rows["over_bill"] == ["0", "—"]  # a class with no key: no amount, rather than a currency-less 0.00


def test_a_bad_row_exits_2_with_one_line(tmp_path):
    config = book(tmp_path, raw=[event("e1", 1), event("e2", "lots")])
    result = recon("reconcile", "--config", str(config))
    assert result.exit_code == 2
    assert result.stderr == f"recon: {tmp_path / 'raw.csv'}: line 3: quantity: not a decimal number ('lots')\n"
    assert result.stdout == ""


def test_a_bad_config_key_exits_2_naming_it(tmp_path):
    config = book(tmp_path)
    config.write_text(config.read_text().replace("unit_size", "unit_sise"))
    result = recon("reconcile", "--config", str(config))
    assert result.exit_code == 2
    assert "meters[0].unit_sise: unknown key" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_missing_config_and_bad_period_exit_2(tmp_path):
    assert recon("reconcile", "--config", str(tmp_path / "none.toml")).exit_code == 2
    result = recon("reconcile", "--config", str(book(tmp_path)), "--period", "Oct")
    assert (result.exit_code, result.stderr.splitlines()[0][:16]) == (2, "recon: --period:")


def test_flags_override_sources(tmp_path):
    config = book(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    write_book(other, [event("x", 100_000)], [metered(100_000)], [line(100, "100.00")])
    result = recon("reconcile", "--config", str(config), "--raw", str(other / "raw.csv"), "--format", "json")
    assert json.loads(result.stdout)["lines"][0]["class"] == "match"


def test_customer_filter(tmp_path):
    raw = [event("e1", 100_000), event("e2", 100_000, customer="cus_b")]
    config = book(tmp_path, raw=raw)
    result = recon("reconcile", "--config", str(config), "--customer", "cus_b", "--format", "json")
    assert [ln["customer_id"] for ln in json.loads(result.stdout)["lines"]] == ["cus_b"]


def test_demo_finds_every_class_and_clears_its_timing_item(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = recon("demo", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    counts = {k: v["count"] for k, v in report["summary"]["classes"].items()}
    assert all(counts.values()), counts
    # the demo keeps to its own database: nothing reaches the configured one
    assert Store.open(Settings.from_env().database_url).count("runs") == 0
    monkeypatch.setenv("RECON_DATABASE_URL", f"sqlite:///{tmp_path / 'recon-demo.db'}")
    watch = json.loads(recon("watchlist", "--all", "--format", "json").stdout)
    assert [(i["customer_id"], i["period"], i["status"]) for i in watch] == [("cus_umbrella", "2026-09", "cleared")]
    assert watch[0]["cleared_by"]["run_id"] == report["run_id"]


def test_demo_table_shows_routing_dry_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = recon("demo")
    assert result.exit_code == 0
    assert "Routing (dry run" in result.stdout
    for where in ("slack:#revops", "ticket:jira", "slack:@U0CSMANNA", "watchlist", "slack:#revops-digest"):
        assert where in result.stdout
    assert "invoice in_umbrella_202610" in result.stdout  # what cleared the timing item


def test_route_dry_run_says_what_would_go_where_and_sends_nothing(tmp_path, monkeypatch):
    config = write_book(
        tmp_path,
        [event("e1", 100_000), event("e2", 30_000)],
        [metered(100_000)],
        [line(100, "100.00")],
        config_text(extra='[[routes]]\nclass = "under_bill"\nto = "slack:#revops"\n'),
    )
    monkeypatch.setenv("RECON_CONFIG", str(config))
    run_id = json.loads(recon("reconcile", "--format", "json").stdout)["run_id"]

    result = recon("route", run_id, "--dry-run")

    assert result.exit_code == 0, result.output
    assert (
        result.stdout
        == "slack:#revops\twould post\tcus_a|api_calls|2026-10\tunder_bill: cus_a · api_calls · 2026-10: 60.00 USD\n"
    )
    assert recon("route", "run_nope", "--dry-run").exit_code == 2


def test_reconcile_route_without_slack_credentials_says_what_was_not_sent(tmp_path):
    config = write_book(
        tmp_path,
        [event("e1", 130_000)],
        [metered(130_000)],
        [line(110, "120.00")],
        config_text(extra='[[routes]]\nclass = "under_bill"\nto = "slack:#revops"\n'),
    )
    result = recon("reconcile", "--config", str(config), "--route", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lines"][0]["class"] == "under_bill"  # stdout is still only the report
    assert "route slack:#revops: not configured: under_bill: cus_a" in result.stderr


def test_migrate_reports_the_schema_version(database_url, monkeypatch):
    monkeypatch.setenv("RECON_DATABASE_URL", database_url)
    result = recon("migrate")
    assert (result.exit_code, result.stdout) == (0, f"schema at version {SCHEMA_VERSION}\n")


def test_an_unreachable_database_is_exit_2_with_one_line(monkeypatch):
    monkeypatch.setenv("RECON_DATABASE_URL", "postgresql://recon:s3cret@127.0.0.1:1/recon?connect_timeout=1")
    result = recon("migrate")
    assert result.exit_code == 2
    assert result.stderr.startswith("recon: cannot connect to PostgreSQL at postgresql://recon@127.0.0.1:1/recon")
    assert len(result.stderr.splitlines()) == 1 and "s3cret" not in result.stderr


def test_the_cli_starts_without_the_database_and_platform_libraries():
    # SQLAlchemy, the Stripe SDK and the worker's handlers cost half a second to import;
    # `recon reconcile` on files and `recon --help` never need them.
    heavy = "('sqlalchemy', 'stripe', 'bot.handlers')"
    probe = f"import sys, bot.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
