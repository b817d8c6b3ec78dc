"""Slack through the official `slack-sdk`: Block Kit alerts and digests, posted once and then
updated in place.

- `SlackPoster` wraps `slack_sdk.WebClient` (`base_url` = `SLACK_API_URL`, else Slack's own)
  with the SDK's rate-limit retry handler (429 → wait `Retry-After`, try again) and a
  pacer that keeps to about one message per second per channel. Both wait through an
  injectable `sleep`, so tests never sleep.
- A message is posted with metadata naming its key and destination (`MESSAGE_EVENT`), so
  a post whose answer was lost (a worker killed mid-call, a dropped connection) is found
  again in the channel's history (`find`) instead of being posted twice: Slack has no
  idempotency key. Scopes for that: `channels:history`, `groups:history`, `im:history`,
  `channels:read`, `groups:read` and `im:write` (to find a channel or a DM by name or user).
- `alert_blocks` / `digest_blocks` build the messages: raw, metered and invoiced units
  side by side, the delta in money, the class, where it broke, and a link to the evidence.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState

from rules.routing import actions_for

DEFAULT_API_URL = WebClient.BASE_URL
MESSAGE_EVENT = "overage_recon_message"  # the metadata event_type of every message the bot posts
Sleep = Callable[[float], None]


class SlackError(RuntimeError):
    """Slack refused a call (the message names the method and Slack's error code)."""


class SlackUnanswered(SlackError):
    """A call got no answer (connection lost, timeout): Slack may or may not have done it."""


class PacedRateLimitHandler(RateLimitErrorRetryHandler):
    """The SDK's 429 handler, waiting `Retry-After` seconds through an injectable `sleep`."""

    def __init__(self, max_retry_count: int = 3, sleep: Sleep = time.sleep) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.sleep = sleep

    def prepare_for_next_attempt(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        if response is None:
            raise error  # type: ignore[misc]
        state.next_attempt_requested = True
        wait = next((v[0] for k, v in response.headers.items() if k.lower() == "retry-after"), "1")
        self.sleep(float(wait))  # float ok: Retry-After seconds
        state.increment_current_attempt()


@dataclass
class Pacer:
    """About one message per `interval` seconds per channel (Slack's posting limit)."""

    interval: float = 1.0
    clock: Callable[[], float] = time.monotonic
    sleep: Sleep = time.sleep
    _next: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, channel: str) -> None:
        with self._lock:
            now = self.clock()
            due = self._next.get(channel, now)
            if due > now:
                self.sleep(due - now)
            self._next[channel] = max(now, due) + self.interval


@dataclass(frozen=True)
class Posted:
    channel: str  # the channel id Slack answered with (chat.update needs it)
    ts: str


class SlackPoster:
    def __init__(
        self,
        token: str,
        api_url: str | None = None,
        *,
        sleep: Sleep = time.sleep,
        pacer: Pacer | None = None,
        timeout: int = 30,
    ) -> None:
        handlers: list[RetryHandler] = [PacedRateLimitHandler(sleep=sleep)]
        self.client = WebClient(
            token=token, base_url=api_url or DEFAULT_API_URL, retry_handlers=handlers, timeout=timeout
        )
        self.pacer = pacer or Pacer(sleep=sleep)

    def post(
        self, channel: str, text: str, blocks: list[dict[str, Any]], tag: Mapping[str, str] | None = None
    ) -> Posted:
        """Post a message; `tag` (e.g. its key and destination) goes with it as message metadata."""
        self.pacer.wait(channel)
        extra = {"metadata": {"event_type": MESSAGE_EVENT, "event_payload": dict(tag)}} if tag else {}
        response = self._call(
            "chat.postMessage", self.client.chat_postMessage, channel=channel, text=text, blocks=blocks, **extra
        )
        return Posted(str(response["channel"]), str(response["ts"]))

    def find(self, channel: str, tag: Mapping[str, str], since: str) -> Posted | None:
        """The message posted to `channel` since the Slack timestamp `since` whose metadata carries
        `tag`, or None (also when the channel cannot be found by its name)."""
        channel_id = self.channel_id(channel)
        if channel_id is None:
            return None
        cursor = None
        while True:
            page = self._call(
                "conversations.history",
                self.client.conversations_history,
                channel=channel_id,
                oldest=since,
                inclusive=True,
                include_all_metadata=True,
                limit=200,
                **({"cursor": cursor} if cursor else {}),
            )
            for message in page.get("messages") or []:
                metadata = message.get("metadata") or {}
                if metadata.get("event_type") == MESSAGE_EVENT and metadata.get("event_payload") == dict(tag):
                    return Posted(channel_id, str(message["ts"]))
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor:
                return None

    def channel_id(self, channel: str) -> str | None:
        """A channel's id: as given if it is one (`C…`, `G…`, `D…`), the DM's for a user (`U…`,
        `W…`), else looked up by name among the channels the bot can see."""
        if channel[:1] in ("C", "G", "D") and channel[1:].isalnum() and channel.isupper():
            return channel
        if channel[:1] in ("U", "W") and channel.isupper():
            return str(self._call("conversations.open", self.client.conversations_open, users=channel)["channel"]["id"])
        name, cursor = channel.removeprefix("#"), None
        while True:
            page = self._call(
                "conversations.list",
                self.client.conversations_list,
                types="public_channel,private_channel",
                exclude_archived=True,
                limit=200,
                **({"cursor": cursor} if cursor else {}),
            )
            for found in page.get("channels") or []:
                if found.get("name") == name:
                    return str(found["id"])
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return None

    def update(self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]]) -> Posted:
        self.pacer.wait(channel)
        response = self._call("chat.update", self.client.chat_update, channel=channel, ts=ts, text=text, blocks=blocks)
        return Posted(str(response["channel"]), str(response["ts"]))

    @staticmethod
    def _call(method: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return call(**kwargs)
        except SlackApiError as exc:
            error = exc.response.get("error") if exc.response is not None else None
            raise SlackError(f"Slack {method}: {error or exc}") from None
        except OSError as exc:  # urllib's URLError, a reset connection, a timeout
            raise SlackUnanswered(f"Slack {method}: no answer ({exc})") from None


def channel_of(destination: str) -> str:
    """`slack:#revops` → `#revops`; `slack:@U123` → `U123` (a DM goes to the user id)."""
    target = destination.split(":", 1)[1]
    return target[1:] if target.startswith("@") else target


# -- messages -------------------------------------------------------------------------


def _money(value: str | Decimal, currency: str) -> str:
    return f"{value} {currency.upper()}"


def alert_text(line: Mapping[str, Any]) -> str:
    """The notification text: names the customer and meter (CONTRACT: Slack)."""
    return (
        f"{line['class']}: {line['customer_id']} · {line['meter']} · {line['period']}: "
        f"{_money(line['delta_amount'], line['currency'])}"
    )


def alert_blocks(
    line: Mapping[str, Any],
    key: str,
    evidence_url: str | None,
    decision: str | None = None,
    owner: str | None = None,
) -> list[dict[str, Any]]:
    """One discrepancy: units side by side, the money, class, place and cause; buttons until decided."""
    units = (
        f"*Raw* {line['raw_units']}  ·  *Metered* {line['metered_units']}  ·  *Invoiced* {line['invoiced_units']}"
        f"  (billable units; late {line['late_units']})"
    )
    fields = [
        {"type": "mrkdwn", "text": f"*Customer*\n{line['customer_id']}"},
        {"type": "mrkdwn", "text": f"*Meter · period*\n{line['meter']} · {line['period']}"},
        {"type": "mrkdwn", "text": f"*Delta*\n{_money(line['delta_amount'], line['currency'])}"},
        {"type": "mrkdwn", "text": f"*Class · broke at*\n{line['class']} · {line['break_at']}"},
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": alert_text(line)[:150]}},
        {"type": "section", "fields": fields},
        {"type": "section", "text": {"type": "mrkdwn", "text": units}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _context(line, evidence_url, owner)}]},
    ]
    if decision:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": decision}})
    else:
        buttons = [
            {
                "type": "button",
                "action_id": action_id,
                "text": {"type": "plain_text", "text": text},
                "value": key,
                **({"style": "primary"} if i == 0 else {}),
            }
            for i, (action_id, text) in enumerate(actions_for(line["class"]))
        ]
        if buttons:
            blocks.append({"type": "actions", "block_id": "recon_decision", "elements": buttons})
    return blocks


def _context(line: Mapping[str, Any], evidence_url: str | None, owner: str | None) -> str:
    parts = [line["cause"]]
    ids = line["evidence"].get("invoice_ids") or []
    if ids:
        parts.append("invoice " + ", ".join(ids))
    if owner:
        parts.append(f"owner <@{owner.lstrip('@')}>")
    if evidence_url:
        parts.append(f"<{evidence_url}|evidence>")
    return " · ".join(parts)[:2900]


def digest_blocks(
    period: str, facts: Mapping[str, Any], key: str, evidence_url: str | None, signed_off: str | None = None
) -> list[dict[str, Any]]:
    """The period digest: counts and amounts by class, what was written back, what is open."""

    def amounts(by_currency: Mapping[str, Decimal]) -> str:
        return ", ".join(_money(v, c) for c, v in sorted(by_currency.items())) or "0"

    rows = [f"• *{k}*: {v['count']} · {amounts(v['amounts'])}" for k, v in facts["classes"].items()] or ["• no breaks"]
    written = [f"• {kind}: {amounts(v)}" for kind, v in facts["written"].items()] or ["• nothing yet"]
    open_ = facts["open"]
    text = "\n".join(
        [
            "*By class*",
            *rows,
            "*Recovered (written back)*",
            *written,
            f"*Still open*: {open_['count']} · {amounts(open_['amounts'])}",
        ]
    )
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"Billing reconciliation digest {period}"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:2900]}},
    ]
    if evidence_url:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{evidence_url}|latest run>"}]})
    if signed_off:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": signed_off}})
    else:
        blocks.append(
            {
                "type": "actions",
                "block_id": "recon_digest",
                "elements": [
                    {
                        "type": "button",
                        "action_id": "sign_off",
                        "style": "primary",
                        "text": {"type": "plain_text", "text": "Sign off"},
                        "value": key,
                    }
                ],
            }
        )
    return blocks
