"""Raw events in many files: a path pattern, local or on S3, read through DuckDB."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import pytest

from connectors.base import InputError
from connectors.files import RawEventsFile, s3_secret
from connectors.raw import raw_source
from rules.periods import month
from rules.timeline import build_timeline
from tests.book import RAW, event, write_csv


def october():
    return build_timeline((month(2026, 10, ZoneInfo("UTC")),), {}, timedelta(hours=48))


def by_key(aggregates) -> list:
    return sorted(aggregates, key=lambda a: (a.customer_id, a.meter, -1 if a.segment is None else a.segment))


FIRST = [event("e1", 1), event("dup", 5, received_at="2026-10-10T12:01:00Z"), event("e2", 2, customer="cus_b")]
SECOND = [
    event("dup", 5, received_at="2026-10-10T12:02:00Z"),
    event("e3", 4),
    event("late", 8, received_at="2026-12-01"),
]


def test_a_csv_pattern_reads_every_match_as_one_table(tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    write_csv(folder / "2026-10-a.csv", RAW, FIRST)
    write_csv(folder / "2026-10-b.csv", RAW, SECOND)
    write_csv(folder / "2026-09-a.csv", RAW, [event("sep", 1000)])  # not matched
    whole = write_csv(tmp_path / "whole.csv", RAW, FIRST + SECOND)
    read = raw_source("events/2026-10-*.csv", tmp_path).aggregate(october(), 10)
    assert by_key(read) == by_key(RawEventsFile(whole).aggregate(october(), 10))
    dup_key = next(a for a in read if a.duplicate_event_ids)
    assert (dup_key.duplicate_event_ids, dup_key.dropped_copies) == (("dup",), 1)


def test_a_parquet_pattern_and_its_fingerprint(tmp_path):
    for name, rows in (("a", FIRST), ("b", SECOND)):
        csv_path = write_csv(tmp_path / f"{name}.csv", RAW, rows)
        duckdb.sql(f"COPY (FROM read_csv('{csv_path}', all_varchar = true)) TO '{tmp_path / name}.parquet'")
    source = RawEventsFile(tmp_path / "*.parquet")
    totals = {(a.customer_id, a.segment): a.quantity for a in source.aggregate(october(), 10)}
    assert totals[("cus_a", 0)] == 10 and totals[("cus_b", 0)] == 2
    before = source.fingerprint()
    assert RawEventsFile(tmp_path / "*.parquet").fingerprint() == before
    (tmp_path / "b.parquet").rename(tmp_path / "c.parquet")
    assert RawEventsFile(tmp_path / "*.parquet").fingerprint() != before


def test_a_bad_row_names_the_matched_file_and_its_line(tmp_path):
    write_csv(tmp_path / "a.csv", RAW, FIRST)
    bad = write_csv(tmp_path / "b.csv", RAW, [event("e7", 1), event("e8", "x")])
    with pytest.raises(InputError) as caught:
        RawEventsFile(tmp_path / "*.csv").aggregate(october(), 10)
    assert str(caught.value) == f"{bad}: line 3: quantity: not a decimal number ('x')"


def test_a_pattern_that_matches_nothing(tmp_path):
    with pytest.raises(InputError, match=r"events/\*\.parquet: no file matches"):
        raw_source("events/*.parquet", tmp_path)


def test_s3_credentials_come_from_the_standard_aws_variables():
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cret",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }
    assert s3_secret(env) == {
        "KEY_ID": "AKIAEXAMPLE",
        "SECRET": "s3cret",
        "REGION": "eu-west-1",
        "ENDPOINT": "127.0.0.1:9000",
        "URL_STYLE": "path",
        "USE_SSL": "false",
    }
    assert s3_secret({}) == {}


def test_an_s3_pattern_loads_httpfs_or_says_in_one_line_why_it_cannot(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    url = "s3://bucket/raw/*.parquet"
    try:
        source = raw_source(url, Path("."))
    except InputError as exc:
        message = str(exc)
        assert message.startswith(f"{url}: DuckDB's httpfs extension is needed")
        assert "\n" not in message and "s3cret" not in message
        return
    secrets = source.table.con.execute("SELECT name, secret_string FROM duckdb_secrets()").fetchall()
    assert [name for name, _ in secrets] == ["recon_s3"]
    assert "127.0.0.1:9" in secrets[0][1] and "s3cret" not in secrets[0][1]
