"""Read-only HTTP routes: health, readiness and stored runs."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, jsonify, request
from flask.typing import ResponseReturnValue

api = Blueprint("api", __name__)

RUN_FILTERS = ("invoice_id", "customer_id", "period", "status")


@api.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify(status="ok")


@api.get("/readyz")
def readyz() -> ResponseReturnValue:
    if current_app.extensions["store"].ping():
        return jsonify(status="ready")
    return jsonify(status="database unreachable"), 503


@api.get("/api/runs")
def list_runs() -> ResponseReturnValue:
    filters = {name: request.args[name] for name in RUN_FILTERS if request.args.get(name)}
    return jsonify(runs=current_app.extensions["store"].list_runs(filters))


@api.get("/api/runs/<run_id>")
def get_run(run_id: str) -> ResponseReturnValue:
    report = current_app.extensions["store"].get_run(run_id)
    if report is None:
        abort(404)
    return jsonify(report)
