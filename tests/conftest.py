from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import responses

from bot.store import Store


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Each test starts with none of the product's variables set and a scratch database."""
    for name in list(os.environ):
        if name.startswith(("RECON_", "STRIPE_", "ORB_", "SLACK_", "JIRA_", "LINEAR_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RECON_DATABASE_URL", f"sqlite:///{tmp_path / 'recon.db'}")


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.open(f"sqlite:///{tmp_path / 'store.db'}")


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
