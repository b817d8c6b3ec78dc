from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import responses

from bot.store import Store
from tests.databases import BACKENDS, database


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Each test starts with none of the product's variables set and a scratch database."""
    for name in list(os.environ):
        if name.startswith(("RECON_", "STRIPE_", "ORB_", "SLACK_", "JIRA_", "LINEAR_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RECON_DATABASE_URL", f"sqlite:///{tmp_path / 'recon.db'}")


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty database, SQLite or PostgreSQL (a schema of its own); every store opened on it
    during the test is closed before it is dropped."""
    opened: list[Store] = []
    real_open = Store.open.__func__  # type: ignore[attr-defined]

    def tracked_open(cls: type[Store], url: str) -> Store:
        store = real_open(cls, url)
        opened.append(store)
        return store

    monkeypatch.setattr(Store, "open", classmethod(tracked_open))
    with database(request.param, tmp_path) as url:
        try:
            yield url
        finally:
            for store in opened:
                store.close()


@pytest.fixture
def store(database_url: str) -> Store:
    return Store.open(database_url)


@pytest.fixture
def stripe_api() -> Iterator[responses.RequestsMock]:
    """Stripe faked at the HTTP boundary; every registered response must be used."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        yield rsps


@pytest.fixture
def orb_api() -> Iterator[responses.RequestsMock]:
    """Orb faked at the HTTP boundary; every registered response must be used."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        yield rsps
