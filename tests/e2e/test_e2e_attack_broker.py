"""Attacks with broker access only, against a real worker: what anyone who can publish to the
broker can and cannot do (docs/trust.md, "The broker").

- A message the worker cannot read (a body of valid JSON but the wrong shape, malformed
  headers), under a governed or a plain task's name, is rejected with a reason; the worker
  keeps serving.
- A released call runs at most once, ever: copies of it (plain, or its release replayed as a
  later attempt) are dropped and audited, never held again.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kombu import Exchange

from governance.integration import ActionDenied, GovernanceHeaders, MessageRefused
from governance.integration.approvals.reviewers import Reviewers
from governance.integration.headers import APPROVALS, CONTEXT
from governance.integration.messages import Envelope
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store.held import HeldStatus, HeldStore
from governance.store.keys import TenantKeys
from tests.e2e.conftest import WorkerProcess, audit_of, types_of, wait_until
from workers.api import submit_tool

pytestmark = [pytest.mark.timeout(120), pytest.mark.both_brokers]

CTX = ActionContext(tenant="t-basic", agent="attacker", run="run-broker")


def publish_raw(app: Celery, task_name: str, body: Any, **headers: Any) -> str:
    """Publish ``body`` as the message of ``task_name`` on the default queue, as anyone who can
    reach the broker may: no Celery client, no governance, any shape."""
    task_id = str(uuid.uuid4())
    message_headers = {"lang": "py", "task": task_name, "id": task_id, "root_id": task_id}
    message_headers.update(headers)
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=Exchange("celery", type="direct"),
            routing_key="celery",
            headers=message_headers,
            serializer="json",
            declare=[app.amqp.queues["celery"]],
        )
    return task_id


def still_serves(app: Celery, worker: WorkerProcess) -> None:
    """The worker's main process is alive and a governed task still runs."""
    assert worker.process is not None
    assert worker.process.poll() is None, worker.log_tail()
    result = submit_tool(app, CTX, "echo", text="still here")
    assert result.get(timeout=30) == {"text": "still here"}


@pytest.mark.parametrize(
    ("task_name", "body", "error", "reason"),
    [
        ("tools.echo", [1, 2], MessageRefused, "cannot be read, rejected without running"),
        ("tools.echo", "a string", MessageRefused, "cannot be read, rejected without running"),
        # Read as Celery's first message protocol, with no arguments: the tool refuses them.
        ("tools.echo", {"args": []}, ActionDenied, "invalid input for echo: text: Field required"),
        ("celery.backend_cleanup", [1, 2], MessageRefused, "cannot be read"),
    ],
    ids=["governed-list", "governed-string", "governed-object", "plain-list"],
)
def test_a_body_of_the_wrong_shape_is_refused_and_the_worker_goes_on(
    app: Celery,
    runtime: GovernanceRuntime,
    worker: WorkerProcess,
    task_name: str,
    body: Any,
    error: type[Exception],
    reason: str,
) -> None:
    context = GovernanceHeaders(context=CTX).to_headers()
    task_id = publish_raw(app, task_name, body, **context)
    result = app.AsyncResult(task_id)
    with pytest.raises(error, match=reason):
        result.get(timeout=30)
    still_serves(app, worker)
    if task_name.startswith("tools."):
        wait_until(lambda: audit_of(runtime, task_id), 10, "the refusal's audit entry")
        (entry,) = audit_of(runtime, task_id)
        assert entry.fields["type"] == "authorization_denied"
        assert reason in entry.fields["reason"]


def test_malformed_headers_are_refused_and_the_worker_goes_on(
    app: Celery, worker: WorkerProcess
) -> None:
    context = GovernanceHeaders(context=CTX).to_headers()
    good_body = [[], {"text": "x"}, {"callbacks": None, "errbacks": None, "chain": None}]
    for headers, reason in (
        ({"timelimit": "soon"}, "cannot be read"),
        ({"retries": "many"}, "malformed retries field"),
        ({"eta": "tomorrow"}, "invalid ETA value"),
    ):
        task_id = publish_raw(app, "tools.echo", good_body, **context, **headers)
        result = app.AsyncResult(task_id)
        wait_until(lambda r=result: r.state in ("FAILURE", "SUCCESS"), 30, f"{headers} to end")
        assert result.state == "FAILURE", (headers, result.state, result.result)
        assert reason in str(result.result), (headers, result.result)
    still_serves(app, worker)


def test_a_release_runs_at_most_once_whatever_copies_of_it_the_broker_carries(
    app: Celery,
    runtime: GovernanceRuntime,
    worker: WorkerProcess,
    workspace: Path,
    keys: dict[str, Ed25519PrivateKey],
) -> None:
    """Attack 2 with broker access only: after a released call ran, a plain copy of its message
    must not hold it again, and its captured release, sent again as "the next retry", must not
    run it again."""
    name = f"released-{uuid.uuid4().hex[:8]}.txt"
    ctx = ActionContext(tenant="t-held", agent="cli-agent", run="run-replay", user="dana")
    held = submit_tool(app, ctx, "write_file", path=name, content="once")
    assert held.state == "HELD"
    Reviewers(app, runtime).approve(held.id, keys["alice"], "ok")
    held.get(timeout=30)
    wait_until(lambda: "task_finished" in types_of(audit_of(runtime, held.id)), 10, "its end")
    (workspace / name).unlink()  # a second run would write it again
    record = runtime.state.client.hget(TenantKeys("t-held").task(held.id), "msg")
    release = Envelope.from_dict(json.loads(record))
    assert release.headers.get(APPROVALS), "the ledger keeps the released message"

    plain = Envelope(
        release.task,
        release.args,
        release.kwargs,
        {**release.options, "headers": {CONTEXT: release.headers[CONTEXT]}},
    )
    runtime.publish(plain)
    wait_until(
        lambda: "release_replayed" in types_of(audit_of(runtime, held.id)), 30, "the copy dropped"
    )
    found = HeldStore(runtime.state).get("t-held", held.id)
    assert found is not None
    assert found.status is HeldStatus.RELEASED, "a task that ended is never held again"

    runtime.publish(release.with_retries(1))
    wait_until(
        lambda: types_of(audit_of(runtime, held.id)).count("release_replayed") >= 2,
        30,
        "the replayed release dropped",
    )
    still_serves(app, worker)
    assert not (workspace / name).exists()
    assert types_of(audit_of(runtime, held.id)).count("admitted") == 1
    assert held.state == "SUCCESS"
