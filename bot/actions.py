"""Slack button clicks, processed by the worker: the decision, the write-back, the message update.

- Approve (under-bill) writes a catch-up charge, Issue credit (over-bill) a credit, each under
  the platform idempotency key `rules.routing.writeback_key(kind, key)`: a double click, a
  retried event or a second worker never writes twice (the store is checked first, and the
  platform itself replays the first result for the same key). A write is marked before the
  platform is called; a retry that finds the mark without a record (the answer was lost)
  looks for what the key wrote on the platform first (`FindsWritten`, Stripe), so neither an
  expired idempotency key nor a draft finalized in between makes a second charge or a refusal.
- Absorb and Dismiss record that we let it go; Sign off closes a period's digest.
- Above `[approvals] second_approver_above`, Approve and Issue credit only propose: a
  second click (the same button, or Confirm) by a *different* Slack user decides. The
  proposer clicking again changes nothing.
- Every stage is recorded with the user and the time, linked to the key and its run; then
  every message of the key is updated to name the decision and the user.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from bot.routing import Router
from bot.store import RoutingLog, Store, now
from connectors.base import FindsWritten, UpstreamRejected, WriteBack
from rules.config import Config
from rules.routing import WRITES, needs_second, split_key, writeback_key

log = logging.getLogger(__name__)

DECISIONS = ("approve", "absorb", "issue_credit", "dismiss", "confirm", "sign_off")
ALLOWED = {"under_bill": ("approve", "absorb"), "over_bill": ("issue_credit", "dismiss")}


class Decider:
    def __init__(
        self,
        store: Store,
        config: Config,
        router: Router,
        writebacks: Mapping[str, Callable[[], WriteBack]],
    ) -> None:
        """`writebacks`: a connector factory per platform with an API key (`stripe`, `orb`)."""
        self.store, self.config, self.router = store, config, router
        self.log = RoutingLog(store)
        self.writebacks = writebacks

    def platform_of(self, run_id: str) -> str:
        """Where a key's correction is written: the platform whose invoice event made its run;
        for a run from files or the period close, the platform the config reads billing from;
        else the only platform with a key."""
        for candidate in (self.store.run_provider(run_id), self.config.sources.platform):
            if candidate in self.writebacks:
                return candidate
        if len(self.writebacks) == 1:
            return next(iter(self.writebacks))
        configured = ", ".join(sorted(self.writebacks)) or "none"
        raise UpstreamRejected(f"run {run_id}: cannot tell which platform bills it (API keys: {configured})")

    def handle(self, payload: dict[str, Any], event_id: str) -> str:
        """Act on a block_actions payload; returns what happened (for the worker's log)."""
        actions = payload.get("actions") or []
        if not actions:
            return "no action"
        action, key = actions[0].get("action_id"), actions[0].get("value") or ""
        user = payload.get("user") or {}
        user_id, user_name = str(user.get("id") or ""), str(user.get("username") or user.get("name") or "")
        if action not in DECISIONS or not user_id or "|" not in key:
            return f"ignored {action}"
        if action == "sign_off":
            posted = self.log.messages(key)
            run_id = posted[0]["run_id"] if posted else "digest"
            self.log.decide(key, "final", "sign_off", user_id, user_name, run_id, event_id)
            self.router.refresh(key)
            return "signed off"
        found = self.store.latest_line(*split_key(key))
        if found is None:
            return f"unknown key {key}"
        run_id, line = found
        outcome = self._decide(key, action, line, run_id, user_id, user_name, event_id)
        self._write_if_decided(key, line, run_id)
        self.router.refresh(key)
        return outcome

    def _decide(
        self, key: str, action: str, line: dict[str, Any], run_id: str, user_id: str, user_name: str, event_id: str
    ) -> str:
        decisions = self.log.decisions(key)
        if "final" in decisions:
            return f"already decided: {decisions['final']['action']}"
        proposed = decisions.get("proposed")
        if action == "confirm" or (proposed is not None and action == proposed["action"]):
            if proposed is None:
                return "nothing to confirm"
            if proposed["user_id"] == user_id:
                log.info("key %s: %s cannot confirm their own proposal", key, user_id)
                return "refused: the proposer cannot confirm"
            self.log.decide(key, "final", proposed["action"], user_id, user_name, run_id, event_id)
            return f"confirmed {proposed['action']}"
        if action not in ALLOWED.get(line["class"], ()):
            return f"ignored {action} on a {line['class']}"
        above = self.config.routing.second_approver_above
        if needs_second(action, Decimal(line["delta_amount"]), above):
            self.log.decide(key, "proposed", action, user_id, user_name, run_id, event_id)
            return f"proposed {action}"
        self.log.decide(key, "final", action, user_id, user_name, run_id, event_id)
        return action

    def _write_if_decided(self, key: str, line: dict[str, Any], run_id: str) -> None:
        final = self.log.decisions(key).get("final")
        if final is None or final["action"] not in WRITES:
            return
        kind = WRITES[final["action"]]
        idempotency_key = writeback_key(kind, key)
        if self.log.writeback(idempotency_key) is not None:
            return
        platform = self.platform_of(run_id)
        target = self.writebacks[platform]()
        found = self._written_before(target, kind, idempotency_key)
        if found is not None:
            platform_id, facts = found
        else:
            facts = {
                "customer_id": split_key(key)[0],
                "invoice_id": self._invoice_of(line, run_id),
                "amount": str(abs(Decimal(line["delta_amount"]))),
                "currency": line["currency"],
            }
            self.log.mark_writing(idempotency_key, now(), facts)
            platform_id = self._write(target, kind, key, line, run_id, idempotency_key)
        self.log.save_writeback(
            idempotency_key,
            key,
            {
                "platform": platform,
                "kind": kind,
                "amount": facts["amount"],
                "currency": facts["currency"],
                "platform_id": platform_id,
            },
            run_id,
        )

    def _written_before(self, target: WriteBack, kind: str, idempotency_key: str) -> tuple[str, dict[str, Any]] | None:
        """What a write begun earlier under this key created, with what it sent, when its answer
        was lost (a mark without a record) and the platform can be asked (`FindsWritten`). It is
        looked for as it was sent (its customer and invoice), whatever the key's newest line says
        now; the record then says what that write sent."""
        mark = self.log.writing(idempotency_key)
        if mark is None or not isinstance(target, FindsWritten):
            return None
        facts = mark["facts"]
        since = datetime.fromisoformat(mark["since"])
        platform_id = target.find_written(kind, facts["customer_id"], facts["invoice_id"], idempotency_key, since)
        return (platform_id, facts) if platform_id is not None else None

    def _invoice_of(self, line: dict[str, Any], run_id: str) -> str | None:
        """The invoice a key's line names, else the one its run was made for."""
        return next(iter(line["evidence"].get("invoice_ids") or []), None) or self.store.run_invoice(run_id)

    def _write(
        self, target: WriteBack, kind: str, key: str, line: dict[str, Any], run_id: str, idempotency_key: str
    ) -> str:
        customer, meter, period = split_key(key)
        amount = abs(Decimal(line["delta_amount"]))
        invoice_id = self._invoice_of(line, run_id)
        span = (datetime.fromisoformat(line["period_start"]), datetime.fromisoformat(line["period_end"]))
        if kind == "charge":
            description = f"Usage catch-up: {meter} {period} ({line['delta_units']} units not billed)"
            # keyword extras: where the charge lands and which key it corrects (see connectors.stripe)
            return target.add_charge(
                customer,
                amount,
                line["currency"],
                description,
                idempotency_key,
                invoice_id=invoice_id,
                meter=meter,
                period=span,
            )
        description = f"Usage credit: {meter} {period} ({line['delta_units']} units billed over usage)"
        return target.issue_credit(
            customer, invoice_id, amount, line["currency"], description, idempotency_key, meter=meter
        )
