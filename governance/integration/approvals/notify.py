"""Reviewers are told when something waits for them: webhooks called when a task is held.

When a task is held (or a suggestion filed), the held store's atomic call also files a
notification in the tenant's outbox. The maintenance leader's notifier thread sends it to each of
the tenant's `notify` targets: a generic JSON webhook (the body below) or a Slack incoming
webhook (a message with the same facts). A target that fails is retried with backoff (1 s, 2 s,
4 s, ... up to ``MAX_ATTEMPTS``); every failure is audited; nothing ever blocks a worker.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

import httpx

from governance import forksafe
from governance.integration.redaction import redact_for_review
from governance.integration.runtime import GovernanceRuntime
from governance.policy.config import Notifier
from governance.policy.tenant import TenantPolicy
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.errors import StoreUnavailable
from governance.store.held import HeldTask
from governance.store.outbox import Notification, Outbox

log = logging.getLogger("governance.notify")

MAX_ATTEMPTS = 8
TIMEOUT_S = 5.0


def notification_body(task: HeldTask, tenant: TenantPolicy) -> dict[str, Any]:
    """What a webhook receives (JSON): the task, the call, why, who may decide, and how.

    The call's secret-named values are masked as a reviewer sees them in ``govctl held show``
    (``*** (sha256:..., N chars)``): the body is kept in the outbox in Redis, then sent to a
    third party (Slack, a webhook)."""
    expires = datetime.fromtimestamp(task.expires_ms / 1000, UTC).isoformat()
    event = "held" if task.blocking else "suggested"
    commands = {"show": f"govctl held show {task.task_id}"}
    if task.blocking:
        commands["approve"] = f"govctl held approve {task.task_id} --key PATH --reason '...'"
        commands["reject"] = f"govctl held reject {task.task_id} --key PATH --reason '...'"
    return {
        "event": event,
        "task_id": task.task_id,
        "tenant": task.tenant,
        "agent": task.agent,
        "run": task.run,
        "requested_by": task.user or None,
        "action": task.action_name,
        "action_class": task.action_class,
        "call": redact_for_review(task.action),
        "reason": task.reason,
        "kind": task.kind,
        "reviewers": sorted(tenant.reviewers),
        "quorum": tenant.approval.quorum,
        "expires_at": expires if task.blocking else None,
        "commands": commands,
    }


def slack_message(body: dict[str, Any]) -> dict[str, Any]:
    """The same facts as a Slack incoming-webhook message."""
    verb = "waits for approval" if body["event"] == "held" else "was suggested"
    lines = [
        f"*{body['action']}* for agent `{body['agent']}` of tenant `{body['tenant']}` {verb}",
        f"requested by: {body.get('requested_by') or 'unknown'}, run `{body['run']}`",
        f"why: {body['reason']}",
    ]
    if body.get("expires_at"):
        lines.append(
            f"reviewers: {', '.join(body['reviewers'])} (quorum {body['quorum']}), "
            f"expires {body['expires_at']}"
        )
    lines += [f"`{command}`" for command in body["commands"].values()]
    return {"text": "\n".join(lines)}


def payload_for(notifier: Notifier, body: dict[str, Any]) -> dict[str, Any]:
    return slack_message(body) if notifier.kind == "slack" else body


class NotifierThread:
    """Sends due notifications while this process leads maintenance (``leading()``)."""

    def __init__(self, runtime: GovernanceRuntime, leading: Any, poll_s: float = 1.0) -> None:
        self._runtime = runtime
        self._leading = leading
        self._poll_s = poll_s
        self._stop = forksafe.event()
        self._thread = threading.Thread(target=self._loop, name="governance-notify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=TIMEOUT_S + 1)

    def _loop(self) -> None:
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as client:
            while not self._stop.wait(self._poll_s):
                if not self._leading():
                    continue
                try:
                    self.run_once(client)
                except StoreUnavailable as exc:
                    log.warning("notifications skipped a round: %s", exc)
                except Exception:
                    log.exception("notifications failed this round")

    def run_once(self, client: httpx.Client) -> int:
        """Send what is due for every tenant; returns how many notifications were settled."""
        outbox = Outbox(self._runtime.state)
        settled = 0
        for name in self._runtime.policy.tenant_names:
            tenant = self._runtime.policy.tenant(name)
            if tenant is None or not tenant.notify:
                continue
            for notification in outbox.due(name):
                settled += self._send(client, outbox, tenant, notification)
        return settled

    def _send(
        self, client: httpx.Client, outbox: Outbox, tenant: TenantPolicy, note: Notification
    ) -> int:
        sent = set(note.sent)
        failures = []
        for index, notifier in enumerate(tenant.notify):
            if index in sent:
                continue
            try:
                response = client.post(notifier.url, json=payload_for(notifier, note.body))
                if 200 <= response.status_code < 300:
                    sent.add(index)
                    continue
                failures.append(f"{notifier.kind} {notifier.url}: HTTP {response.status_code}")
            except httpx.HTTPError as exc:
                failures.append(f"{notifier.kind} {notifier.url}: {type(exc).__name__}: {exc}")
        if not failures:
            outbox.done(tenant.name, note.id)
            return 1
        attempt = note.attempts + 1
        giving_up = attempt >= MAX_ATTEMPTS
        self._runtime.audit(
            AuditEvent(
                type=AuditEventType.NOTIFY_FAILED,
                tenant=tenant.name,
                agent=str(note.body.get("agent", "")),
                run=str(note.body.get("run", "")),
                task_id=str(note.body.get("task_id", "")),
                action=str(note.body.get("action", "")),
                reason="; ".join(failures)
                + ("; giving up" if giving_up else f"; retry in {2 ** (attempt - 1)} s"),
                detail={"attempt": attempt},
            )
        )
        if giving_up:
            outbox.done(tenant.name, note.id)
            return 1
        outbox.retry_later(tenant.name, note, sent, delay_s=2 ** (attempt - 1))
        return 0
