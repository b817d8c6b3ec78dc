"""The Flask app factory: wiring only."""

from __future__ import annotations

import logging

from flask import Flask

from bot.api import api
from bot.config import Settings
from bot.signatures import OrbVerifier, SlackVerifier, StripeVerifier, Verifier
from bot.store import Store
from bot.webhooks import webhooks


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.webhook_max_bytes
    store = Store.open(settings.database_url)
    store.defer_checkpoints()  # the worker checkpoints when idle: no WAL stall in a webhook's answer
    app.extensions["store"] = store
    app.extensions["verifiers"] = verifiers(settings)
    app.register_blueprint(api)
    app.register_blueprint(webhooks)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return app


def verifiers(settings: Settings) -> dict[str, Verifier]:
    """A verifier for each platform whose webhook secret is set."""
    found: dict[str, Verifier] = {}
    if settings.stripe_webhook_secrets:
        found["stripe"] = StripeVerifier(settings.stripe_webhook_secrets)
    if settings.orb_webhook_secrets:
        found["orb"] = OrbVerifier(settings.orb_webhook_secrets)
    if settings.slack_signing_secret:
        found["slack"] = SlackVerifier(settings.slack_signing_secret)
    return found
