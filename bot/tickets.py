"""Ticket queues and outbound webhooks through `requests`: Jira Cloud, Linear, a signed sink.

Each ticket is opened once per discrepancy key. The key's token (`recon-<id>`) goes on the
ticket (a Jira label; a marker line in a Linear description), and every attempt first looks
for it: a create that timed out but went through is found by the retry instead of opened
twice. Timeouts, connection errors, 429 and 5xx are retried (tenacity); other answers are final.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from connectors.base import UpstreamRejected, UpstreamUnavailable

LINEAR_API_URL = "https://api.linear.app/graphql"


@dataclass(frozen=True)
class TicketRequest:
    key: str  # the discrepancy key
    token: str  # its short token, recon-<id>
    title: str
    summary: list[str]  # paragraphs
    evidence: dict[str, Any]  # the report line
    evidence_url: str | None = None
    assignee: str | None = None  # the queue's own user id (Jira accountId, Linear user id)


@dataclass(frozen=True)
class Ticket:
    external_id: str
    reference: str  # BILL-12, ENG-7, the webhook delivery id
    url: str


class Queue(Protocol):
    name: str

    def open(self, request: TicketRequest) -> Ticket: ...


def retrying(attempts: int = 4, wait_initial: float = 0.5, wait_max: float = 8) -> Retrying:
    return Retrying(
        retry=retry_if_exception_type(UpstreamUnavailable),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=wait_initial, max=wait_max),
        reraise=True,
    )


def _send(session: requests.Session, what: str, method: str, url: str, **kwargs: Any) -> requests.Response:
    """One request; transient failures raise `UpstreamUnavailable`, refusals `UpstreamRejected`."""
    try:
        response = session.request(method, url, timeout=kwargs.pop("timeout", 20), **kwargs)
    except (requests.Timeout, requests.ConnectionError) as exc:
        raise UpstreamUnavailable(f"{what}: {type(exc).__name__}") from None
    if response.status_code == 429 or response.status_code >= 500:
        raise UpstreamUnavailable(f"{what}: HTTP {response.status_code}")
    if response.status_code >= 400:
        raise UpstreamRejected(f"{what}: HTTP {response.status_code}: {response.text[:200]}")
    return response


def _json(response: requests.Response, what: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise UpstreamRejected(f"{what}: answer is not JSON") from None


# -- Jira Cloud (REST v3) ---------------------------------------------------------------


def adf(request: TicketRequest) -> dict[str, Any]:
    """The description as an Atlassian Document Format document, the evidence as a JSON block."""

    def paragraph(text: str, href: str | None = None) -> dict[str, Any]:
        node: dict[str, Any] = {"type": "text", "text": text}
        if href:
            node["marks"] = [{"type": "link", "attrs": {"href": href}}]
        return {"type": "paragraph", "content": [node]}

    content = [paragraph(text) for text in request.summary]
    if request.evidence_url:
        content.append(paragraph("Evidence (the run's report)", request.evidence_url))
    evidence = json.dumps(request.evidence, indent=2, sort_keys=True)
    content.append(
        {"type": "codeBlock", "attrs": {"language": "json"}, "content": [{"type": "text", "text": evidence}]}
    )
    content.append(paragraph(f"recon-key: {request.token}"))
    return {"type": "doc", "version": 1, "content": content}


class SearchFirst:
    """A queue that looks for the key's ticket before opening one, on every attempt: a create
    that timed out but landed is found by the retry instead of opened twice."""

    retry: Retrying

    def open(self, request: TicketRequest) -> Ticket:
        return self.retry(self._open_once, request)

    def _open_once(self, request: TicketRequest) -> Ticket:
        return self.find(request.token) or self.create(request)

    def find(self, token: str) -> Ticket | None:
        raise NotImplementedError

    def create(self, request: TicketRequest) -> Ticket:
        raise NotImplementedError


class JiraQueue(SearchFirst):
    name = "jira"

    def __init__(
        self,
        base_url: str,
        email: str,
        api_token: str,
        project: str,
        issue_type: str = "Task",
        session: requests.Session | None = None,
        retry: Retrying | None = None,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.project, self.issue_type = project, issue_type
        self.session = session or requests.Session()
        self.session.auth = (email, api_token)
        self.session.headers.update({"Accept": "application/json"})
        self.retry = retry or retrying()

    def find(self, token: str) -> Ticket | None:
        response = _send(
            self.session,
            "Jira search",
            "GET",
            f"{self.base}/rest/api/3/search/jql",
            params={"jql": f'labels = "{token}"', "fields": "summary", "maxResults": 1},
        )
        issues = _json(response, "Jira search").get("issues") or []
        return self._ticket(issues[0]) if issues else None

    def create(self, request: TicketRequest) -> Ticket:
        fields: dict[str, Any] = {
            "project": {"key": self.project},
            "issuetype": {"name": self.issue_type},
            "summary": request.title[:250],
            "description": adf(request),
            "labels": ["overage-recon", request.token],
        }
        if request.assignee:
            fields["assignee"] = {"accountId": request.assignee}
        response = _send(
            self.session, "Jira create issue", "POST", f"{self.base}/rest/api/3/issue", json={"fields": fields}
        )
        return self._ticket(_json(response, "Jira create issue"))

    def _ticket(self, issue: dict[str, Any]) -> Ticket:
        return Ticket(str(issue["id"]), str(issue["key"]), f"{self.base}/browse/{issue['key']}")


# -- Linear (GraphQL) -----------------------------------------------------------------------

LINEAR_FIND = """query ReconIssue($marker: String!) {
  issues(filter: {description: {contains: $marker}}, first: 1) { nodes { id identifier url } }
}"""
LINEAR_CREATE = """mutation ReconIssueCreate($input: IssueCreateInput!) {
  issueCreate(input: $input) { success issue { id identifier url } }
}"""


def markdown(request: TicketRequest) -> str:
    parts = [*request.summary]
    if request.evidence_url:
        parts.append(f"[Evidence (the run's report)]({request.evidence_url})")
    parts.append("```json\n" + json.dumps(request.evidence, indent=2, sort_keys=True) + "\n```")
    parts.append(f"recon-key: {request.token}")
    return "\n\n".join(parts)


class LinearQueue(SearchFirst):
    name = "linear"

    def __init__(
        self,
        api_key: str,
        team_id: str,
        api_url: str | None = None,
        session: requests.Session | None = None,
        retry: Retrying | None = None,
    ) -> None:
        self.url = api_url or LINEAR_API_URL
        self.team_id = team_id
        self.session = session or requests.Session()
        self.session.headers.update({"Authorization": api_key, "Content-Type": "application/json"})
        self.retry = retry or retrying()

    def find(self, token: str) -> Ticket | None:
        data = self._graphql("Linear issue search", LINEAR_FIND, {"marker": f"recon-key: {token}"})
        nodes = data["issues"]["nodes"]
        return self._ticket(nodes[0]) if nodes else None

    def create(self, request: TicketRequest) -> Ticket:
        issue_input: dict[str, Any] = {
            "teamId": self.team_id,
            "title": request.title[:250],
            "description": markdown(request),
        }
        if request.assignee:
            issue_input["assigneeId"] = request.assignee
        data = self._graphql("Linear issueCreate", LINEAR_CREATE, {"input": issue_input})
        payload = data["issueCreate"]
        if not payload.get("success") or not payload.get("issue"):
            raise UpstreamRejected("Linear issueCreate: success is false")
        return self._ticket(payload["issue"])

    def _graphql(self, what: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        response = _send(self.session, what, "POST", self.url, json={"query": query, "variables": variables})
        body = _json(response, what)
        if body.get("errors"):
            raise UpstreamRejected(f"{what}: {body['errors'][0].get('message', 'error')}")
        return body["data"]

    @staticmethod
    def _ticket(issue: dict[str, Any]) -> Ticket:
        return Ticket(str(issue["id"]), str(issue["identifier"]), str(issue["url"]))


# -- generic signed webhook ---------------------------------------------------------------

SIGNATURE_HEADER = "X-Recon-Signature"
DELIVERY_HEADER = "X-Recon-Delivery"


def sign_webhook(body: bytes, secret: str, timestamp: int) -> str:
    """`t=<unix s>,v1=<hex HMAC-SHA256 of "{t}.{body}">`, the scheme Stripe uses for its own."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_webhook(body: bytes, header: str, secret: str, now: float | None = None, tolerance: int = 300) -> bool:
    """For a receiver: the signature matches and is at most `tolerance` seconds old."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign_webhook(body, secret, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class WebhookSink:
    """POSTs each finding as JSON, signed; the delivery id (the key's token) lets the receiver
    drop a repeat."""

    def __init__(
        self,
        name: str,
        url: str,
        secret: str | None,
        session: requests.Session | None = None,
        retry: Retrying | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name, self.url, self.secret = f"webhook:{name}", url, secret
        self.session = session or requests.Session()
        self.retry = retry or retrying()
        self.clock = clock

    def open(self, request: TicketRequest) -> Ticket:
        return self.retry(self._post_once, request)

    def _post_once(self, request: TicketRequest) -> Ticket:
        body = json.dumps(
            {
                "id": request.token,
                "type": "overage_recon.discrepancy",
                "key": request.key,
                "title": request.title,
                "evidence_url": request.evidence_url,
                "line": request.evidence,
            },
            sort_keys=True,
        ).encode()
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: request.token}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign_webhook(body, self.secret, int(self.clock()))
        _send(self.session, f"webhook {self.name}", "POST", self.url, data=body, headers=headers)
        return Ticket(request.token, request.token, self.url)
