"""Which raw events source a `[sources] raw` value (or `--raw`) names: files or a database."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from connectors.files import RawEventsFile
from rules.config import Config, RawTable

if TYPE_CHECKING:  # SQLAlchemy takes a quarter of a second to import; a files run never needs it
    from connectors.sql import RawEventsSQL

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
FILE_SCHEMES = {"s3", "s3a", "s3n", "gs", "gcs", "r2", "http", "https"}

RawSource: TypeAlias = "RawEventsFile | RawEventsSQL"


def is_database(spec: str) -> bool:
    """`env:VARIABLE` or a URL whose scheme is not a file store's (`postgresql://`, `snowflake://`...)."""
    match = SCHEME.match(spec)
    return spec.startswith("env:") or bool(match and match.group(1).lower() not in FILE_SCHEMES)


def is_remote(spec: str) -> bool:
    """A URL read as files through DuckDB (`s3://bucket/prefix/*.parquet`)."""
    match = SCHEME.match(spec)
    return bool(match and match.group(1).lower() in FILE_SCHEMES)


def resolve(spec: str | Path, base_dir: Path) -> str | Path:
    """A path relative to the config's folder; URLs and `env:` values as they are."""
    text = str(spec)
    if is_database(text) or is_remote(text):
        return text
    return base_dir / text


def raw_source(spec: str | Path, base_dir: Path, config: Config | None = None) -> RawSource:
    """The raw events source that `spec` names (a path is relative to `base_dir`);
    a database's table and columns are the config's `[sources.raw_table]`."""
    where = resolve(spec, base_dir)
    if isinstance(where, str) and is_database(where):
        from connectors.sql import RawEventsSQL

        return RawEventsSQL(where, config.sources.raw_table if config else RawTable())
    return RawEventsFile(where)
