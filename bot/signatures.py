"""Verifying a platform's webhook signature and reading the event's envelope.

A verifier takes the raw body and the request headers and returns an
`InboundEvent`, or raises `SignatureInvalid` (bad, missing or stale signature) or
`MalformedEvent` (signed, but not an event we can read). Nothing here stores or acts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol
from urllib.parse import parse_qs

import stripe
from slack_sdk.signature import Clock, SignatureVerifier

STRIPE_TOLERANCE_SECONDS = 300  # the SDK's default tolerance
ORB_TOLERANCE = timedelta(minutes=5)  # the Orb SDK's window, both ways


class SignatureInvalid(ValueError):
    """The signature is missing, wrong for every configured secret, or too old."""


class MalformedEvent(ValueError):
    """The body is signed but is not a readable event."""


@dataclass(frozen=True)
class InboundEvent:
    provider: str
    event_id: str
    type: str
    account: str | None
    body: str
    subject: str | None = None  # the invoice the event is about, when it is about one


class Verifier(Protocol):
    provider: str

    def verify(self, body: bytes, headers: Mapping[str, str]) -> InboundEvent: ...


@dataclass(frozen=True)
class StripeVerifier:
    """`Stripe-Signature` checked by the official SDK against each secret in turn (rotation)."""

    secrets: tuple[str, ...]
    tolerance: int = STRIPE_TOLERANCE_SECONDS
    provider: str = "stripe"

    def verify(self, body: bytes, headers: Mapping[str, str]) -> InboundEvent:
        header = headers.get("Stripe-Signature")
        if not header:
            raise SignatureInvalid("missing Stripe-Signature header")
        if not any(self._matches(body, header, secret) for secret in self.secrets):
            raise SignatureInvalid("no configured secret matches the Stripe-Signature, or it is too old")
        payload = _json_object(body)
        if payload.get("object") != "event" or not payload.get("id") or not payload.get("type"):
            raise MalformedEvent("not a Stripe event (object, id or type missing)")
        return InboundEvent(
            "stripe",
            str(payload["id"]),
            str(payload["type"]),
            payload.get("account"),
            _text(body),
            subject=stripe_invoice_of(payload),
        )

    def _matches(self, body: bytes, header: str, secret: str) -> bool:
        try:
            stripe.WebhookSignature.verify_header(_text(body), header, secret, tolerance=self.tolerance)
        except stripe.SignatureVerificationError:
            return False
        return True


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class OrbVerifier:
    """`X-Orb-Signature` checked against each secret in turn (rotation), as Orb's SDK checks it.

    Signed bytes: `v1:` + the `X-Orb-Timestamp` header exactly as sent + `:` + the raw body,
    HMAC-SHA256 keyed with the secret's UTF-8 bytes, lowercase hex; the header holds
    space-separated `v1=<hex>` entries and any one may match. The timestamp (ISO-8601,
    UTC when it has no offset) must be within 5 minutes of now, either way. The clock is
    a field so the SDK's own test vector (from 2024) can be checked.
    """

    secrets: tuple[str, ...]
    tolerance: timedelta = ORB_TOLERANCE
    provider: str = "orb"
    clock: Callable[[], datetime] = field(default=utc_now, compare=False)

    def verify(self, body: bytes, headers: Mapping[str, str]) -> InboundEvent:
        stamp, header = headers.get("X-Orb-Timestamp"), headers.get("X-Orb-Signature")
        if not stamp or not header:
            raise SignatureInvalid("missing X-Orb-Timestamp or X-Orb-Signature header")
        self._check_time(stamp)
        signed = b"v1:" + stamp.encode() + b":" + body
        given = [value for version, _, value in (p.partition("=") for p in header.split(" ")) if version == "v1"]
        if not any(self._matches(signed, secret, given) for secret in self.secrets):
            raise SignatureInvalid("no configured secret matches the X-Orb-Signature")
        payload = _json_object(_text(body), parse_float=Decimal)
        if not isinstance(payload.get("id"), str) or not isinstance(payload.get("type"), str):
            raise MalformedEvent("not an Orb event (id or type missing)")
        if not payload["id"] or not payload["type"]:
            raise MalformedEvent("not an Orb event (id or type empty)")
        return InboundEvent("orb", payload["id"], payload["type"], None, _text(body), subject=orb_invoice_of(payload))

    def _check_time(self, stamp: str) -> None:
        try:
            moment = datetime.fromisoformat(stamp)
        except ValueError:
            raise SignatureInvalid("X-Orb-Timestamp is not an ISO-8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        if abs(self.clock() - moment) > self.tolerance:
            raise SignatureInvalid("X-Orb-Timestamp is more than 5 minutes off")

    @staticmethod
    def _matches(signed: bytes, secret: str, given: list[str]) -> bool:
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        return any(hmac.compare_digest(expected, value) for value in given)


def orb_invoice_of(payload: dict[str, Any]) -> str | None:
    """The invoice an Orb event is about: the embedded invoice, or the one a credit note reduces."""
    invoice = payload.get("invoice")
    if isinstance(invoice, dict) and isinstance(invoice.get("id"), str):
        return invoice["id"]
    note = payload.get("credit_note")
    if isinstance(note, dict) and isinstance(note.get("invoice_id"), str):
        return note["invoice_id"]
    return None


class _Clock(Clock):
    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now

    def now(self) -> float:
        return self._now()


@dataclass(frozen=True)
class SlackVerifier:
    """Slack's v0 request signature (`X-Slack-Signature`, `X-Slack-Request-Timestamp`, at most
    5 minutes off), checked by slack-sdk; the interaction is the form field `payload`."""

    secret: str = field(repr=False)
    clock: Callable[[], float] = time.time
    provider: str = "slack"

    def verify(self, body: bytes, headers: Mapping[str, str]) -> InboundEvent:
        verifier = SignatureVerifier(self.secret, clock=_Clock(self.clock))
        if not verifier.is_valid(body, headers.get("X-Slack-Request-Timestamp"), headers.get("X-Slack-Signature")):
            raise SignatureInvalid("missing, wrong or stale X-Slack-Signature")
        fields = parse_qs(_text(body))
        if "payload" not in fields:
            raise MalformedEvent("no payload form field")
        text = fields["payload"][0]
        payload = _json_object(text)
        kind = payload.get("type")
        if not isinstance(kind, str):
            raise MalformedEvent("payload has no type")
        event_id = payload.get("trigger_id") or hashlib.sha256(body).hexdigest()[:32]
        team = payload.get("team") if isinstance(payload.get("team"), dict) else {}
        actions = payload.get("actions") if isinstance(payload.get("actions"), list) else []
        subject = actions[0].get("value") if actions and isinstance(actions[0], dict) else None
        return InboundEvent("slack", str(event_id), kind, team.get("id"), text, subject=subject)


def stripe_invoice_of(payload: dict[str, Any]) -> str | None:
    """The invoice a Stripe event is about: the invoice itself, or the one a credit note reduces."""
    data = payload.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        return None
    if obj.get("object") == "invoice":
        return obj.get("id")
    invoice = obj.get("invoice")
    if isinstance(invoice, dict):
        return invoice.get("id")
    return invoice if isinstance(invoice, str) else None


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEvent("body is not UTF-8") from None


def _json_object(text: str, parse_float: Callable[[str], Any] = float) -> dict[str, Any]:
    try:
        payload = json.loads(text, parse_float=parse_float)
    except ValueError:
        raise MalformedEvent("body is not JSON") from None
    if not isinstance(payload, dict):
        raise MalformedEvent("body is not a JSON object")
    return payload
