"""POST /webhooks/stripe: signed with the test secret exactly as Stripe signs, never patched."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest

from bot.app import create_app
from bot.config import Settings

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stripe"
SECRET, OLD_SECRET = "whsec_test_current", "whsec_test_previous"


def sign(body: str, secret: str = SECRET, at: int | None = None) -> str:
    """Stripe's scheme: HMAC-SHA256 of `{t}.{body}` keyed with the whole `whsec_` string."""
    timestamp = int(time.time()) if at is None else at
    signature = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={signature}"


def invoice_created(event_id: str = "evt_1", kind: str = "invoice.created") -> str:
    event = json.loads((FIXTURES / "event_invoice_created.json").read_text())
    event.update(id=event_id, type=kind)
    return json.dumps(event)


@pytest.fixture
def app(database_url):
    settings = Settings(
        database_url=database_url,
        stripe_webhook_secrets=(SECRET, OLD_SECRET),
        webhook_max_bytes=64 * 1024,
    )
    return create_app(settings)


def post(client, body: str, signature: str | None):
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return client.post("/webhooks/stripe", data=body, headers=headers)


def inbox(app):
    return app.extensions["store"].events()


def test_a_signed_event_is_stored_before_the_answer(app):
    body = invoice_created()
    response = post(app.test_client(), body, sign(body))
    assert response.status_code == 200
    (row,) = inbox(app)
    assert (row["event_id"], row["type"], row["status"]) == ("evt_1", "invoice.created", "pending")


def test_the_second_secret_of_a_rotation_is_accepted(app):
    body = invoice_created()
    assert post(app.test_client(), body, sign(body, OLD_SECRET)).status_code == 200


@pytest.mark.parametrize("signature", [None, "garbage", "t=123", "wrong secret"])
def test_bad_signatures_are_refused_and_nothing_stored(app, signature):
    body = invoice_created()
    if signature == "wrong secret":
        signature = sign(body, "whsec_wrong")
    assert post(app.test_client(), body, signature).status_code == 400
    assert inbox(app) == []


def test_a_stale_timestamp_is_refused(app):
    body = invoice_created()
    assert post(app.test_client(), body, sign(body, at=int(time.time()) - 301)).status_code == 400
    assert inbox(app) == []


def test_a_body_altered_after_signing_is_refused(app):
    body = invoice_created()
    signature = sign(body)
    assert post(app.test_client(), body.replace("invoice.created", "invoice.voided"), signature).status_code == 400
    assert inbox(app) == []


def test_malformed_json_is_refused_even_when_signed(app):
    body = '{"id": "evt_1", "type": '
    assert post(app.test_client(), body, sign(body)).status_code == 400
    assert inbox(app) == []


def test_an_oversized_body_is_413(app):
    body = json.dumps({"id": "evt_big", "object": "event", "type": "invoice.created", "pad": "x" * 70_000})
    assert post(app.test_client(), body, sign(body)).status_code == 413
    assert inbox(app) == []


def test_a_redelivered_event_id_changes_nothing(app):
    client = app.test_client()
    body = invoice_created()
    assert post(client, body, sign(body)).json == {"received": True, "duplicate": False}
    assert post(client, body, sign(body)).json == {"received": True, "duplicate": True}
    assert len(inbox(app)) == 1


def test_an_unknown_type_is_stored_for_the_worker_to_ignore(app):
    body = invoice_created("evt_ping", "customer.created")
    assert post(app.test_client(), body, sign(body)).status_code == 200
    assert [r["type"] for r in inbox(app)] == ["customer.created"]


def test_a_platform_with_no_secret_configured_is_404(tmp_path):
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}"))
    body = invoice_created()
    assert post(app.test_client(), body, sign(body)).status_code == 404
