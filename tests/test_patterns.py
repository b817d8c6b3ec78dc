"""Raw events in many files: a path pattern, local or on S3, read through DuckDB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any
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


def test_without_httpfs_or_s3fs_an_s3_pattern_says_in_one_line_why_it_cannot_be_read(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # not installed
    url = "s3://bucket/raw/*.parquet"
    try:
        source = raw_source(url, Path("."))
    except InputError as exc:
        message = str(exc)
        assert message.startswith(f"{url}: DuckDB's httpfs extension is needed")
        assert message.endswith("or install s3fs (pip install 'overage-recon[s3]')")
        assert "\n" not in message and "s3cret" not in message
        return
    secrets = source.table.con.execute("SELECT name, secret_string FROM duckdb_secrets()").fetchall()
    assert [name for name, _ in secrets] == ["recon_s3"]  # httpfs loaded here: the variables are its secret
    assert "127.0.0.1:9" in secrets[0][1] and "s3cret" not in secrets[0][1]


class Bucket:
    """A bucket of its own on the local S3 server (moto keeps one store per process)."""

    def __init__(self, client: Any) -> None:
        self.client, self.name = client, f"usage-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=self.name)

    def put(self, path: Path, key: str) -> str:
        self.client.upload_file(str(path), self.name, key)
        return f"s3://{self.name}/{key}"


@pytest.fixture
def s3(monkeypatch):
    """A local S3 server (moto's) and a fresh bucket on it; the AWS variables point at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        variables = {
            "AWS_ACCESS_KEY_ID": "AKIATESTING",
            "AWS_SECRET_ACCESS_KEY": "s3cret-testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        yield Bucket(boto3.client("s3", endpoint_url=variables["AWS_ENDPOINT_URL"]))
    finally:
        server.stop()


def reads_through_httpfs() -> bool:
    """Whether this machine reads s3:// through DuckDB's httpfs (else through s3fs)."""
    try:
        duckdb.connect().execute("LOAD httpfs")
    except duckdb.Error:
        return False
    return True


def test_an_s3_pattern_reads_every_object_as_one_table_and_fingerprints_them(tmp_path, s3):
    for name, rows in (("2026-10-a", FIRST), ("2026-10-b", SECOND), ("2026-09-a", [event("sep", 1000)])):
        s3.put(write_csv(tmp_path / f"{name}.csv", RAW, rows), f"raw/{name}.csv")
    whole = write_csv(tmp_path / "whole.csv", RAW, FIRST + SECOND)
    url = f"s3://{s3.name}/raw/2026-10-*.csv"

    source = raw_source(url, tmp_path)
    assert by_key(source.aggregate(october(), 10)) == by_key(RawEventsFile(whole).aggregate(october(), 10))
    if not reads_through_httpfs():
        assert source.table.con.list_filesystems() != []  # s3fs, registered on the connection
    before = source.fingerprint()
    assert raw_source(url, tmp_path).fingerprint() == before
    elsewhere = subprocess.run(  # a host in another time zone names the same objects the same way
        [sys.executable, "-c", f"from connectors.raw import raw_source; print(raw_source({url!r}, '.').fingerprint())"],
        env={**os.environ, "TZ": "America/New_York"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert elsewhere.stdout.strip() == before
    with pytest.raises(InputError, match=r"raw/2027-\*\.csv: no file matches"):
        raw_source(f"s3://{s3.name}/raw/2027-*.csv", tmp_path).fingerprint()
    s3.put(write_csv(tmp_path / "more.csv", RAW, [event("e9", 1)]), "raw/2026-10-c.csv")
    again = raw_source(url, tmp_path)
    assert again.fingerprint() != before
    total = sum(a.quantity for a in RawEventsFile(whole).aggregate(october(), 10))
    assert sum(a.quantity for a in again.aggregate(october(), 10)) == total + 1


def test_a_bad_row_on_s3_names_the_object_and_its_line(tmp_path, s3):
    s3.put(write_csv(tmp_path / "a.csv", RAW, FIRST), "raw/a.csv")
    bad = s3.put(write_csv(tmp_path / "b.csv", RAW, [event("e7", 1), event("e8", "x")]), "raw/b.csv")
    with pytest.raises(InputError) as caught:
        raw_source(f"s3://{s3.name}/raw/*.csv", tmp_path).aggregate(october(), 10)
    assert str(caught.value) == f"{bad}: line 3: quantity: not a decimal number ('x')"


def test_recon_reconcile_reads_raw_events_from_s3(tmp_path, s3):
    from click.testing import CliRunner

    from bot.cli import main
    from tests.book import line, metered, write_book

    config = write_book(tmp_path, FIRST + SECOND, [metered(15)], [line(1, "0.00")])
    url = s3.put(tmp_path / "raw.csv", "raw/all.csv")
    command = ["reconcile", "--config", str(config), "--format", "json", "--period", "2026-10"]
    local = CliRunner().invoke(main, command)
    config.write_text(config.read_text().replace('raw = "raw.csv"', f'raw = "{url}"'))
    remote = CliRunner().invoke(main, command)
    assert (local.exit_code, remote.exit_code) == (0, 0), remote.output
    assert json.loads(remote.stdout)["lines"] == json.loads(local.stdout)["lines"] != []
    assert "s3cret" not in remote.output


def test_an_error_from_python_inside_duckdb_is_its_last_line():
    from connectors.files import _first_line

    passed_on = RuntimeError(
        'IO Error: Traceback (most recent call last):\n  File "s3fs/core.py", line 1, in _call\n'
        "botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL\n"
    )
    last = "botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL"
    assert _first_line(passed_on) == last
    assert _first_line(RuntimeError("Binder Error: no column x\nLINE 1: ...")) == "Binder Error: no column x"
