"""Verifying a platform's webhook signature and reading the event's envelope.

A verifier takes the raw body and the request headers and returns an
`InboundEvent`, or raises `SignatureInvalid` (bad, missing or stale signature) or
`MalformedEvent` (signed, but not an event we can read). Nothing here stores or acts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

import stripe
from slack_sdk.signature import Clock, SignatureVerifier

STRIPE_TOLERANCE_SECONDS = 300  # the SDK's default tolerance


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


def _json_object(text: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except ValueError:
        raise MalformedEvent("body is not JSON") from None
    if not isinstance(payload, dict):
        raise MalformedEvent("body is not a JSON object")
    return payload
