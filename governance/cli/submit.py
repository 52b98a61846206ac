"""``govctl submit``: enqueue a governed task of the configured app for a context.

``task NAME`` publishes any governed task by its Celery name; ``tool NAME`` the governed task
that is the policy's tool NAME; ``llm`` the app's governed LLM task. The action is authorized
at once: a denial exits 1 and nothing is enqueued; an approval-tier action is held (state HELD)
for ``govctl held approve``. With ``--wait`` the command waits for the result and exits 1
unless the task succeeded (a held task exits 1 at once, naming the command that decides it).
A call the task's function cannot take (an unknown input field, a missing argument) exits 1
before anything is published.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from governance.cli import context, output
from governance.cli.errors import CliError, ExitCode
from governance.cli.output import JsonFlag

app = typer.Typer(
    help="Enqueue a governed action (a tool call or an LLM call) for a context.",
    no_args_is_help=True,
)

Tenant = Annotated[str, typer.Option("--tenant", "-t", help="The tenant acting.")]
Agent = Annotated[str, typer.Option("--agent", "-a", help="The agent acting.")]
Run = Annotated[str, typer.Option("--run", help="The agent run the action belongs to.")]
User = Annotated[
    str | None, typer.Option("--user", "-u", help="The person on whose behalf it acts.")
]
Wait = Annotated[
    float | None,
    typer.Option(
        "--wait",
        "-w",
        min=0,
        metavar="SECONDS",
        help="Wait up to SECONDS for the result and print it; exit 1 unless it succeeded "
        "(a held task exits 1 at once: it waits for a reviewer, see `govctl held approve`).",
    ),
]


def _context(tenant: str, agent: str, run: str, user: str | None) -> Any:
    from pydantic import ValidationError

    from governance.policy.context import ActionContext

    try:
        return ActionContext(tenant=tenant, agent=agent, run=run, user=user)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise typer.BadParameter(problems) from None


def _tool_input(raw_json: str | None, items: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if raw_json is not None:
        try:
            loaded = json.loads(raw_json)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--input") from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--input")
        values.update(loaded)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="-i")
        if key.endswith(":"):  # key:=JSON
            try:
                values[key[:-1]] = json.loads(value)
            except ValueError as exc:
                raise typer.BadParameter(f"{item!r}: not JSON: {exc}", param_hint="-i") from None
        else:
            values[key] = value
    return values


Items = Annotated[
    list[str] | None,
    typer.Option(
        "--item",
        "-i",
        help="One keyword argument: key=value (a string) or key:=JSON; repeatable, "
        "and overrides --input.",
    ),
]
RawInput = Annotated[
    str | None, typer.Option("--input", help="The keyword arguments as a JSON object.")
]


@app.command("task")
def task(
    name: Annotated[str, typer.Argument(help="The task's Celery name, e.g. tools.echo.")],
    tenant: Tenant,
    agent: Agent,
    run: Run,
    user: User = None,
    positional: Annotated[
        list[str] | None,
        typer.Option("--arg", help="One positional argument as JSON; repeatable, in order."),
    ] = None,
    raw_input: RawInput = None,
    items: Items = None,
    wait: Wait = None,
    as_json: JsonFlag = False,
) -> None:
    """Enqueue any governed task registered in the app, by name.

    Example: govctl submit task reports.summarize -t acme -a bot --run r1 --arg '"q3"'
    -i pages:=3 --wait 30
    """
    from governance.integration.governed import is_governed

    celery_app = context.celery_app()
    found = celery_app.tasks.get(name)
    if found is None or not is_governed(found):
        governed = sorted(t.name for t in celery_app.tasks.values() if is_governed(t))
        raise CliError(
            f"no governed task named {name!r} in the app; governed tasks: "
            + (", ".join(governed) or "none"),
            ExitCode.REFUSED,
        )
    args = [_json_arg(value) for value in positional or []]
    kwargs = _tool_input(raw_input, items or [])
    ctx = _context(tenant, agent, run, user)
    _report(_publish(celery_app, found, ctx, args, kwargs), wait, as_json)


@app.command("tool")
def tool(
    name: Annotated[str, typer.Argument(help="The tool, e.g. echo, write_file, shell.")],
    tenant: Tenant,
    agent: Agent,
    run: Run,
    user: User = None,
    raw_input: RawInput = None,
    items: Items = None,
    wait: Wait = None,
    as_json: JsonFlag = False,
) -> None:
    """Enqueue one tool call for a context: the governed task that is the policy's tool NAME.

    Example: govctl submit tool write_file -t acme -a bot --run r1 -i path=notes.txt
    -i content=hi --wait 10
    """
    from governance.integration.governed import is_governed
    from governance.integration.worker.task import GovernedLLMTask

    celery_app = context.celery_app()
    tools = {
        t.tool_name: t
        for t in celery_app.tasks.values()
        if is_governed(t) and not isinstance(t, GovernedLLMTask)
    }
    if name not in tools:
        raise CliError(
            f"unknown tool {name!r}: no governed task of the app is that tool; tools: "
            + (", ".join(sorted(tools)) or "none"),
            ExitCode.REFUSED,
        )
    ctx = _context(tenant, agent, run, user)
    kwargs = _tool_input(raw_input, items or [])
    _report(_publish(celery_app, tools[name], ctx, [], kwargs), wait, as_json)


@app.command("llm")
def llm(
    tenant: Tenant,
    agent: Agent,
    run: Run,
    provider: Annotated[str, typer.Option("--provider", "-p", help="The LLM provider.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The provider's model.")],
    messages: Annotated[
        list[str], typer.Option("--message", help="A user message; repeatable, in order.")
    ],
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Most output tokens (reserved up front).")
    ],
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    task_name: Annotated[
        str | None,
        typer.Option("--task", help="The LLM task's name, when the app has more than one."),
    ] = None,
    user: User = None,
    wait: Wait = None,
    as_json: JsonFlag = False,
) -> None:
    """Enqueue one LLM call (chat completion) against a provider's model."""
    celery_app = context.celery_app()
    found = _llm_task(celery_app, task_name)
    ctx = _context(tenant, agent, run, user)
    chat = [{"role": "system", "content": system}] if system else []
    chat += [{"role": "user", "content": text} for text in messages]
    kwargs = {"provider": provider, "model": model, "messages": chat, "max_tokens": max_tokens}
    _report(_publish(celery_app, found, ctx, [], kwargs), wait, as_json)


def _llm_task(celery_app: Any, name: str | None) -> Any:
    from governance.integration.governed import is_governed
    from governance.integration.worker.task import GovernedLLMTask

    llm_tasks = {
        t.name: t
        for t in celery_app.tasks.values()
        if is_governed(t) and isinstance(t, GovernedLLMTask)
    }
    if name is not None and name in llm_tasks:
        return llm_tasks[name]
    if name is None and len(llm_tasks) == 1:
        return next(iter(llm_tasks.values()))
    known = ", ".join(sorted(llm_tasks)) or "none"
    if name is None and llm_tasks:
        raise CliError(f"the app has several LLM tasks ({known}): name one with --task")
    raise CliError(
        f"no governed LLM task {'named ' + repr(name) + ' ' if name else ''}in the app; "
        f"LLM tasks: {known}",
        ExitCode.REFUSED,
    )


def _json_arg(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise typer.BadParameter(f"{raw!r} is not JSON: {exc}", param_hint="--arg") from None


def _publish(celery_app: Any, task: Any, ctx: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    from governance.integration import submit

    context.runtime()  # the deployment's runtime: the state Redis it records the task in is one
    _check_call(task, args, kwargs)
    _reachable(celery_app)
    return submit(task, ctx, *args, **kwargs)


def _check_call(task: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse (exit 1) a call the task's function cannot take, naming what it takes, instead
    of the TypeError Celery's own argument check raises while publishing."""
    import inspect

    try:
        signature = inspect.signature(task.run)
    except (TypeError, ValueError):  # no signature to check against: Celery decides
        return
    params = signature.parameters.values()
    takes = ", ".join(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    problem = None
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        unknown = sorted(set(kwargs) - {p.name for p in params if p.kind is not p.POSITIONAL_ONLY})
        if unknown:
            problem = f"unknown input field(s) {', '.join(map(repr, unknown))}"
    if problem is None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            problem = str(exc)
    if problem is not None:
        raise CliError(
            f"invalid input for task {task.name!r}: {problem} (it takes: {takes or 'nothing'})",
            ExitCode.REFUSED,
        )


def _reachable(app: Any) -> Any:
    """Fail fast (exit 6) when the broker is down, instead of Celery's long reconnect loop."""
    from kombu.exceptions import OperationalError

    with app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2)
        except OperationalError as exc:
            raise CliError(
                f"broker unavailable: {conn.as_uri()}: {exc}", ExitCode.BROKER_UNAVAILABLE
            ) from None
    return app


def _plain(value: Any) -> Any:
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _report(result: Any, wait: float | None, as_json: bool) -> None:
    """Print the task's id and state (and with ``--wait`` its result). With ``--wait``, exit 1
    unless it succeeded: a held task is not done, so it exits 1 at once, saying how to decide
    it (waiting for a human inside a script's timeout helps nobody)."""
    state = str(result.state)
    payload: dict[str, Any] = {"task_id": result.id, "state": state}
    failed = False
    if state == "HELD":
        payload["next"] = f"govctl held approve {result.id} --key PATH"
        _say(payload, as_json)
        if wait is not None:
            raise CliError(
                f"task {result.id} is held for approval, not done: a reviewer decides it with "
                f"`{payload['next']}` (or `govctl held reject {result.id} --key PATH --reason ...`)"
            )
        return
    if wait is not None:
        from celery.exceptions import TimeoutError as ResultTimeout

        try:
            result.get(timeout=wait, propagate=False)
        except ResultTimeout:
            _say(payload, as_json)
            info = result.info
            why = info.get("reason") if isinstance(info, dict) else None
            raise CliError(
                f"task {result.id} did not finish within {wait:g}s (state: {result.state}"
                + (f": {why})" if why else ")")
            ) from None
        state = payload["state"] = str(result.state)
        payload["result"] = _plain(result.result)
        failed = state != "SUCCESS"
    _say(payload, as_json)
    if failed:
        raise CliError(f"task {result.id} ended {state}: {payload['result']}", ExitCode.REFUSED)


def _say(payload: dict[str, Any], as_json: bool) -> None:
    if as_json:
        output.emit_json(payload)
        return
    output.show(f"task {payload['task_id']}: {payload['state']}")
    if "next" in payload:
        output.show(f"held for approval: {payload['next']}")
    if "result" in payload:
        output.show(json.dumps(payload["result"], indent=2, default=str))
