"""POST /webhooks/orb: signed exactly as Orb signs, checked against the SDK's own test vector."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from orb import Orb

from bot.app import create_app
from bot.config import Settings
from bot.signatures import OrbVerifier, SignatureInvalid
from tests.orb_fake import INVOICE, invoice, line_item

VECTOR = json.loads(
    (Path(__file__).resolve().parents[2] / "shared/fixtures/orb/webhook_resource_event_test.json").read_text()
)
SECRET, OLD_SECRET = "orb_whsec_current", "orb_whsec_previous"


def stamp(at: datetime | None = None) -> str:
    return (at or datetime.now(UTC)).replace(tzinfo=None).isoformat(timespec="milliseconds")


def sign(body: str, secret: str = SECRET, at: datetime | None = None) -> dict[str, str]:
    """Orb's scheme: HMAC-SHA256 of `v1:{timestamp}:{body}`, hex, in `X-Orb-Signature: v1=...`."""
    timestamp = stamp(at)
    digest = hmac.new(secret.encode(), f"v1:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Orb-Timestamp": timestamp, "X-Orb-Signature": f"v1={digest}"}


def invoice_issued(event_id: str = "evt_orb_1", kind: str = "invoice.issued") -> str:
    """The envelope of Orb's `invoice.issued` (orb.types.InvoiceIssuedWebhookEvent)."""
    event = {
        "id": event_id,
        "created_at": "2026-11-01T12:00:00+00:00",
        "type": kind,
        "payload_style": "expanded",
        "properties": {"automatically_marked_as_paid": False},
        "invoice": invoice([line_item("li_api")]),
    }
    return json.dumps(event)


@pytest.fixture
def app(tmp_path):
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'hooks.db'}",
        orb_webhook_secrets=(SECRET, OLD_SECRET),
        webhook_max_bytes=64 * 1024,
    )
    return create_app(settings)


def post(client, body: str, headers: dict[str, str] | None):
    return client.post("/webhooks/orb", data=body, headers={"Content-Type": "application/json", **(headers or {})})


def inbox(app):
    return app.extensions["store"].events()


def test_the_sdk_test_vector_verifies_at_its_own_time():
    sent = datetime(2024, 3, 27, 15, 42, 29, 551000, tzinfo=UTC)
    verifier = OrbVerifier(("some-other-secret", VECTOR["secret"]), clock=lambda: sent)

    event = verifier.verify(VECTOR["raw_body"].encode(), VECTOR["headers"])

    assert (event.provider, event.event_id, event.type, event.subject) == (
        "orb",
        "o4mmewpfNNTnjfZc",
        "resource_event.test",
        None,
    )
    with pytest.raises(SignatureInvalid, match="5 minutes"):
        OrbVerifier((VECTOR["secret"],), clock=lambda: sent + timedelta(minutes=6)).verify(
            VECTOR["raw_body"].encode(), VECTOR["headers"]
        )


def test_our_signing_agrees_with_the_orb_sdk():
    body = invoice_issued()
    headers = sign(body)
    Orb(api_key="unused", webhook_secret=SECRET).webhooks.verify_signature(body, headers)  # raises if not


def test_a_signed_invoice_event_is_stored_before_the_answer(app):
    body = invoice_issued()
    response = post(app.test_client(), body, sign(body))
    assert response.status_code == 200
    (row,) = inbox(app)
    assert (row["provider"], row["event_id"], row["type"], row["status"]) == (
        "orb",
        "evt_orb_1",
        "invoice.issued",
        "pending",
    )
    assert app.extensions["store"].covers("orb", INVOICE)  # the event's subject is its invoice


def test_the_second_secret_of_a_rotation_is_accepted(app):
    body = invoice_issued()
    assert post(app.test_client(), body, sign(body, OLD_SECRET)).status_code == 200


@pytest.mark.parametrize("case", ["none", "wrong secret", "garbage", "v0 only", "bad time"])
def test_bad_signatures_are_refused_and_nothing_stored(app, case):
    body = invoice_issued()
    headers = {
        "none": None,
        "wrong secret": sign(body, "orb_whsec_wrong"),
        "garbage": {"X-Orb-Timestamp": stamp(), "X-Orb-Signature": "garbage"},
        "v0 only": {**sign(body), "X-Orb-Signature": sign(body)["X-Orb-Signature"].replace("v1=", "v0=")},
        "bad time": {**sign(body), "X-Orb-Timestamp": "yesterday"},
    }[case]
    assert post(app.test_client(), body, headers).status_code == 400
    assert inbox(app) == []


@pytest.mark.parametrize("offset", [timedelta(minutes=-6), timedelta(minutes=6)])
def test_a_timestamp_more_than_5_minutes_off_is_refused(app, offset):
    body = invoice_issued()
    assert post(app.test_client(), body, sign(body, at=datetime.now(UTC) + offset)).status_code == 400
    assert inbox(app) == []


def test_a_body_altered_after_signing_is_refused(app):
    body = invoice_issued()
    headers = sign(body)
    assert post(app.test_client(), body.replace("invoice.issued", "invoice.edited"), headers).status_code == 400
    assert inbox(app) == []


@pytest.mark.parametrize("body", ['{"id": "evt_1", "type": ', '["a list"]', '{"type": "invoice.issued"}'])
def test_malformed_events_are_refused_even_when_signed(app, body):
    assert post(app.test_client(), body, sign(body)).status_code == 400
    assert inbox(app) == []


def test_an_oversized_body_is_413(app):
    body = json.dumps({"id": "evt_big", "type": "invoice.issued", "pad": "x" * 70_000})
    assert post(app.test_client(), body, sign(body)).status_code == 413
    assert inbox(app) == []


def test_a_redelivered_event_id_changes_nothing(app):
    client = app.test_client()
    body = invoice_issued()
    assert post(client, body, sign(body)).json == {"received": True, "duplicate": False}
    assert post(client, body, sign(body)).json == {"received": True, "duplicate": True}
    assert len(inbox(app)) == 1


def test_the_test_ping_is_stored_for_the_worker_to_ignore(app):
    body = VECTOR["raw_body"]
    assert post(app.test_client(), body, sign(body)).status_code == 200
    assert [r["type"] for r in inbox(app)] == ["resource_event.test"]
