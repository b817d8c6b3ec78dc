"""Read-only HTTP routes: health, readiness and stored runs."""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app, jsonify, request, stream_with_context
from flask.typing import ResponseReturnValue

from bot.render import json_pieces

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
    """The run's report, streamed as the store keeps its lines (a run of 500,000 keys is
    never built in memory); `?lines=breaks` leaves the matches out."""
    store = current_app.extensions["store"]
    head = store.run_head(run_id)
    if head is None:
        abort(404)
    breaks_only = request.args.get("lines") == "breaks"
    lines = store.line_texts(run_id, breaks_only=True) if breaks_only else store.line_blocks(run_id)
    return Response(stream_with_context(json_pieces(head, lines)), mimetype="application/json")
