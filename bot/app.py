"""The Flask app factory: wiring only."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from bot.api import api
from bot.config import Settings
from bot.store import Store


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.extensions["store"] = Store.open(settings.database_url)
    app.register_blueprint(api)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return app


def store_of(app: Any) -> Store:
    return app.extensions["store"]
