"""Webhook intake: verify, store, answer. No API call, no reconciliation here.

An event is in the inbox (committed) before the 2xx leaves; a redelivered event id
answers 2xx and changes nothing. The worker does the rest.
"""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from bot.signatures import MalformedEvent, SignatureInvalid, Verifier

log = logging.getLogger(__name__)
webhooks = Blueprint("webhooks", __name__)
STORED, DUPLICATE = '{"duplicate":false,"received":true}', '{"duplicate":true,"received":true}'
JSON = {"Content-Type": "application/json"}


@webhooks.post("/webhooks/<provider>")
def receive(provider: str) -> ResponseReturnValue:
    stored = intake(provider, refused=400)
    if not isinstance(stored, bool):
        return stored
    return (STORED if stored else DUPLICATE), 200, JSON


@webhooks.post("/slack/actions")
def slack_actions() -> ResponseReturnValue:
    """Slack interactivity: verified, stored, acknowledged with an empty 200 (Slack allows 3 s);
    the worker makes the decision, the write-back and the message update."""
    stored = intake("slack", refused=401)
    return stored if not isinstance(stored, bool) else ("", 200)


def intake(provider: str, refused: int) -> bool | ResponseReturnValue:
    """Verify and store one inbound event: True if stored, False if a duplicate, else the refusal."""
    verifier: Verifier | None = current_app.extensions["verifiers"].get(provider)
    if verifier is None:
        return jsonify(error=f"no webhook secret configured for {provider!r}"), 404
    body = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH: 413 before we read it
    try:
        event = verifier.verify(body, request.headers)
    except SignatureInvalid as exc:
        log.warning("webhook %s refused: %s", provider, exc)
        return jsonify(error="invalid signature"), refused
    except MalformedEvent as exc:
        log.warning("webhook %s refused: %s", provider, exc)
        return jsonify(error=str(exc)), 400
    stored: bool = current_app.extensions["store"].save_event(event)
    log.debug("webhook %s %s %s %s", provider, event.event_id, event.type, "stored" if stored else "duplicate")
    return stored
