"""A fake Slack Web API on a local HTTP server (slack-sdk speaks urllib, which `responses` cannot see).

It answers `chat.postMessage` and `chat.update` in Slack's shapes: `{ok, channel, ts, message}`
with the channel's id (`C...`) however the channel was named, `{ok: false, error}` for a
refusal, and HTTP 429 with `Retry-After` and `{ok: false, error: "ratelimited"}` when told
to rate-limit the next calls.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []  # every request, 429s included
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}  # (channel id, ts) → message
        self.rate_limited = 0  # answer this many next calls with 429
        self.retry_after = "3"
        self.missing: set[str] = set()  # channels the bot is not in: channel_not_found
        self._seq = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                method = self.path.rsplit("/", 1)[-1]
                status, headers, answer = fake.answer(method, body, self.headers.get("Authorization", ""))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/"

    def __enter__(self) -> FakeSlack:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def posted(self, method: str = "chat.postMessage") -> list[dict[str, Any]]:
        """Calls of a method that Slack accepted (no 429)."""
        return [body for name, body in self.calls if name == method and body.get("_answered") == 200]

    @staticmethod
    def channel_id(channel: str) -> str:
        if channel[:1] in ("C", "D"):  # already an id
            return channel
        if channel[:1] == "U":  # a DM to a user is answered with the DM channel's id
            return "D" + channel[1:]
        return "C" + hashlib.sha256(channel.encode()).hexdigest()[:8].upper()

    def answer(self, method: str, body: dict[str, Any], auth: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        with self._lock:
            self.calls.append((method, body))
            if not auth.startswith("Bearer xoxb-"):
                body["_answered"] = 200
                return 200, {}, {"ok": False, "error": "not_authed"}
            if self.rate_limited:
                self.rate_limited -= 1
                body["_answered"] = 429
                return 429, {"Retry-After": self.retry_after}, {"ok": False, "error": "ratelimited"}
            body["_answered"] = 200
            if body["channel"] in self.missing:
                return 200, {}, {"ok": False, "error": "channel_not_found"}
            channel = self.channel_id(body["channel"])
            if method == "chat.postMessage":
                self._seq += 1
                ts = f"{1790812800 + self._seq}.{self._seq:06d}"
                message = self._message(body, ts)
                self.messages[(channel, ts)] = message
                return 200, {}, {"ok": True, "channel": channel, "ts": ts, "message": message}
            if method == "chat.update":
                if (channel, body["ts"]) not in self.messages:
                    return 200, {}, {"ok": False, "error": "message_not_found"}
                message = self._message(body, body["ts"])
                self.messages[(channel, body["ts"])] = message
                return (
                    200,
                    {},
                    {"ok": True, "channel": channel, "ts": body["ts"], "text": body["text"], "message": message},
                )
            return 200, {}, {"ok": False, "error": "unknown_method"}

    @staticmethod
    def _message(body: dict[str, Any], ts: str) -> dict[str, Any]:
        return {
            "type": "message",
            "subtype": "bot_message",
            "text": body.get("text", ""),
            "ts": ts,
            "username": "overage-recon",
            "bot_id": "B0RECON01",
            "blocks": body.get("blocks", []),
        }


def block_actions(
    action_id: str,
    value: str,
    user: str = "U0APPROVER",
    trigger: str = "1388105719492.1379717998065.9bc163894734c1f415a2c504e81dec91",
    channel: str = "C0REVOPS",
    message_ts: str = "1790812801.000001",
) -> dict[str, Any]:
    """A block_actions interaction payload, shaped as Slack sends it for a button click."""
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0RECON"},
        "api_app_id": "A0RECON",
        "token": "legacy-verification-token",
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel, "is_ephemeral": False},
        "trigger_id": trigger,
        "team": {"id": "T0RECON", "domain": "acme"},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel, "name": "revops"},
        "message": {"type": "message", "ts": message_ts, "bot_id": "B0RECON01", "text": "...", "blocks": []},
        "state": {"values": {}},
        "response_url": "https://hooks.slack.com/actions/T0RECON/1/abc",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "recon_decision",
                "text": {"type": "plain_text", "text": action_id, "emoji": True},
                "value": value,
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }


def signed_form(payload: dict[str, Any], secret: str, at: int | None = None) -> tuple[str, dict[str, str]]:
    """The form body Slack posts (`payload=<json>`) and its v0 signature headers."""
    body = urlencode({"payload": json.dumps(payload)})
    timestamp = str(int(time.time()) if at is None else at)
    digest = hmac.new(secret.encode(), f"v0:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": f"v0={digest}",
    }
    return body, headers
