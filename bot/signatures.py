"""Verifying a platform's webhook signature and reading the event's envelope.

A verifier takes the raw body and the request headers and returns an
`InboundEvent`, or raises `SignatureInvalid` (bad, missing or stale signature) or
`MalformedEvent` (signed, but not an event we can read). Nothing here stores or acts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import stripe

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
