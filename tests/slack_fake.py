"""A fake Slack Web API on a local HTTP server (slack-sdk speaks urllib, which `responses` cannot see).

It answers `chat.postMessage` and `chat.update` in Slack's shapes: `{ok, channel, ts, message}`
with the channel's id (`C...`) however the channel was named, `{ok: false, error}` for a
refusal, and HTTP 429 with `Retry-After` and `{ok: false, error: "ratelimited"}` when told
to rate-limit the next calls. Messages keep their `metadata`, which `conversations.history`
(newest first, from `oldest`, paged by `limit` and `cursor`) returns; `conversations.list`
lists the channels posted to by name, and `conversations.open` gives a user's DM channel.
Told to `lose` a channel's next post, it posts and then drops the connection unanswered, as
when a worker dies between Slack's answer and saving it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []  # every request, 429s included
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}  # (channel id, ts) → message
        self.rate_limited = 0  # answer this many next calls with 429
        self.retry_after = "3"
        self.missing: set[str] = set()  # channels the bot is not in: channel_not_found
        self.lose: set[str] = set()  # channels (as named in the call) whose next post is made, then unanswered
        self.names: dict[str, str] = {}  # channel name → id, for the channels posted to by name
        self._seq = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                self._answer(url.path.rsplit("/", 1)[-1], dict(parse_qsl(url.query)))

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
                    body = dict(parse_qsl(raw.decode()))
                else:
                    body = json.loads(raw or b"{}")
                self._answer(self.path.rsplit("/", 1)[-1], body)

            def _answer(self, method: str, body: dict[str, Any]) -> None:
                status, headers, answer = fake.answer(method, body, self.headers.get("Authorization", ""))
                if status == 0:  # lost: the call was done, the answer never comes
                    self.close_connection = True
                    self.connection.close()
                    return
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
            if method == "conversations.list":
                return 200, {}, self._channels(body)
            if method == "conversations.open":
                channel = self.channel_id(body["users"])
                return 200, {}, {"ok": True, "no_op": True, "already_open": True, "channel": {"id": channel}}
            if body["channel"] in self.missing:
                return 200, {}, {"ok": False, "error": "channel_not_found"}
            channel = self.channel_id(body["channel"])
            if method == "conversations.history":
                return 200, {}, self._history(channel, body)
            if method == "chat.postMessage":
                self._seq += 1
                ts = f"{int(time.time())}.{self._seq:06d}"  # as Slack stamps it: the time of posting
                message = self._message(body, ts)
                self.messages[(channel, ts)] = message
                if not body["channel"].startswith(("C", "D", "U")):
                    self.names[body["channel"].removeprefix("#")] = channel
                if body["channel"] in self.lose:
                    self.lose.discard(body["channel"])
                    body["_answered"] = 0
                    return 0, {}, {}
                return 200, {}, {"ok": True, "channel": channel, "ts": ts, "message": message}
            if method == "chat.update":
                if (channel, body["ts"]) not in self.messages:
                    return 200, {}, {"ok": False, "error": "message_not_found"}
                message = self._message(body, body["ts"])
                if "metadata" in self.messages[(channel, body["ts"])] and "metadata" not in message:
                    message["metadata"] = self.messages[(channel, body["ts"])]["metadata"]  # kept, as Slack does
                self.messages[(channel, body["ts"])] = message
                return (
                    200,
                    {},
                    {"ok": True, "channel": channel, "ts": body["ts"], "text": body["text"], "message": message},
                )
            return 200, {}, {"ok": False, "error": "unknown_method"}

    def _channels(self, body: dict[str, Any]) -> dict[str, Any]:
        """conversations.list: the channels posted to by name, `limit` a page, paged by `cursor`."""
        channels = [
            {"id": cid, "name": name, "is_channel": True, "is_archived": False, "is_member": True}
            for name, cid in sorted(self.names.items())
        ]
        start, size = int(body.get("cursor") or 0), int(body.get("limit") or 100)
        more = start + size < len(channels)
        page = channels[start : start + size]
        return {"ok": True, "channels": page, "response_metadata": {"next_cursor": str(start + size) if more else ""}}

    def _history(self, channel: str, body: dict[str, Any]) -> dict[str, Any]:
        """conversations.history: newest first, from `oldest` (inclusive), paged by `limit`/`cursor`."""
        oldest = float(body.get("oldest") or 0)
        found = sorted(
            (m for (cid, ts), m in self.messages.items() if cid == channel and float(ts) >= oldest),
            key=lambda m: float(m["ts"]),
            reverse=True,
        )
        start, size = int(body.get("cursor") or 0), int(body.get("limit") or 100)
        more = start + size < len(found)
        return {
            "ok": True,
            "messages": found[start : start + size],
            "has_more": more,
            "pin_count": 0,
            "channel_actions_ts": None,
            "channel_actions_count": 0,
            "response_metadata": {"next_cursor": str(start + size) if more else ""},
        }

    @staticmethod
    def _message(body: dict[str, Any], ts: str) -> dict[str, Any]:
        message = {
            "type": "message",
            "subtype": "bot_message",
            "text": body.get("text", ""),
            "ts": ts,
            "username": "overage-recon",
            "bot_id": "B0RECON01",
            "blocks": body.get("blocks", []),
        }
        if body.get("metadata"):
            message["metadata"] = body["metadata"]
        return message


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
