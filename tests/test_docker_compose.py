"""docker-compose.yml and the Dockerfile, checked without Docker (it is not on CI machines).

The compose file is parsed as YAML, and every command it runs is resolved against this checkout:
``celery -A <module> <subcommand> <options>`` must name an importable module, a Celery
subcommand that exists (Flower's included) and options that subcommand knows; ``python -m
<module>`` must name an importable module. Secrets must be required, never defaulted, and the
Redis that holds the broker and the governance state requires a password.

The ``rabbitmq`` profile (a RabbitMQ broker, and workers and a Flower on it) is checked the same
way, and must leave plain ``docker compose up`` exactly as it was.

Nothing is exposed by default: every published port binds the host's loopback. ``govctl`` has a
service of its own (profile ``tools``, run on demand) that holds no key: a reviewer mounts theirs
for one run. The policy the image ships lists no example reviewer keys.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from celery import Celery
from kombu.utils.url import url_to_parts

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
APP_SERVICES = ("worker", "flower", "metrics")
SECRETS = ("GOVERNANCE_AUDIT_KEY",)
REDIS_PASSWORD = "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
RABBITMQ_PROFILE = "rabbitmq"
RABBITMQ_APP_SERVICES = ("worker-rabbitmq", "flower-rabbitmq")
#: What the rabbitmq profile's variables expand to in the checks below.
RABBITMQ_VARIABLES = {"RABBITMQ_USER": "governance", "RABBITMQ_PASSWORD": "s3cret"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def runnable_module(name: str) -> bool:
    """``python -m name`` can run: a module, or a package with a ``__main__``."""
    if not module_exists(name):
        return False
    spec = importlib.util.find_spec(name)
    assert spec is not None
    return spec.submodule_search_locations is None or module_exists(f"{name}.__main__")


def celery_option_names(subcommand: str) -> set[str]:
    """Options the Celery subcommand accepts (Flower's come from tornado.options)."""
    if subcommand == "flower":
        import flower.options  # noqa: F401  (defines Flower's options)
        from tornado.options import options

        return {"--" + name.replace("_", "-") for name in options}
    from celery.bin.celery import celery

    names: set[str] = set()
    for param in celery.commands[subcommand].params:
        names.update(param.opts)
        names.update(param.secondary_opts)
    return names


def check_entry_point(argv: list[str]) -> None:
    """``argv`` runs something that exists in this checkout, with options it accepts."""
    if argv[0] == "celery":
        from celery.bin.celery import celery

        assert argv[1] in ("-A", "--app"), f"{argv}: name the app with -A <module>"
        module, subcommand, options = argv[2], argv[3], argv[4:]
        assert module_exists(module), f"{argv}: no module {module!r}"
        assert subcommand in celery.commands, f"{argv}: celery has no {subcommand!r} command"
        if subcommand == "flower":
            assert module_exists("flower"), "the flower command needs the flower package"
        known = celery_option_names(subcommand)
        for option in options:
            if option.startswith("-"):
                name = option.split("=", 1)[0]
                assert name in known, f"{argv}: {subcommand} has no option {name}"
    elif argv[0] == "govctl":
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        assert scripts.get("govctl") == "governance.cli.main:main", "the image installs govctl"
        from governance.cli.main import app

        command = typer.main.get_command(app)
        words = [a for a in argv[1:] if not a.startswith("-")]
        assert not words or words[0] in command.commands, f"{argv}: govctl has no {words[0]!r}"
    elif argv[0] in ("python", "python3"):
        assert argv[1] == "-m", f"{argv}: run a module with python -m"
        assert runnable_module(argv[2]), (
            f"{argv}: no runnable module {argv[2]!r} in this checkout (the service would exit)"
        )
    else:
        raise AssertionError(f"{argv}: unknown entry point {argv[0]!r}")


def test_the_four_services_are_there(services: dict[str, Any]) -> None:
    assert {"redis", *APP_SERVICES} <= set(services)


def test_redis_is_official_persistent_and_health_checked(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    redis = services["redis"]
    assert re.fullmatch(r"redis:[\w.\-]+", redis["image"]), "use the official redis image"
    argv = command_of(redis)
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data", "the AOF lives in /data"
    assert volume in (compose.get("volumes") or {}), "a named volume, declared at the top"


def test_redis_requires_a_password_and_the_healthcheck_uses_it(services: dict[str, Any]) -> None:
    redis = services["redis"]
    argv = command_of(redis)
    assert argv[argv.index("--requirepass") + 1] == REDIS_PASSWORD
    # redis-cli authenticates with REDISCLI_AUTH, so the healthcheck PING is an authenticated one
    # and must answer PONG (an unauthenticated PING is answered with NOAUTH).
    assert environment_of(redis)["REDISCLI_AUTH"] == REDIS_PASSWORD
    test = redis["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    assert re.fullmatch(r"redis-cli ping \| grep -q PONG", test[1])


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_command_names_an_entry_point_that_exists(
    services: dict[str, Any], name: str
) -> None:
    check_entry_point(command_of(services[name]))


def test_the_worker_and_flower_run_the_example_app(services: dict[str, Any]) -> None:
    worker, flower = command_of(services["worker"]), command_of(services["flower"])
    assert worker[:4] == ["celery", "-A", "workers.app", "worker"]
    # Task events only while Flower asks for them (-E would send them always, watched or not).
    assert "-E" not in worker
    assert flower[:4] == ["celery", "-A", "workers.app", "flower"]
    assert "--port=5555" in flower
    # Flower listens on loopback unless told otherwise (config/flowerconfig.py): inside its
    # container, every interface of the container's network; the host publishes it on loopback.
    assert "--address=0.0.0.0" in flower
    metrics = command_of(services["metrics"])
    assert metrics == [
        "python",
        "-m",
        "governance.metrics",
        "--address",
        "0.0.0.0",
        "--port",
        "9108",
    ]
    # The container listens on every interface of its own network; the host publishes the
    # port on its loopback only (usage per tenant is not public).
    assert services["metrics"]["ports"] == ["127.0.0.1:9108:9108"]


def test_the_worker_scales_and_waits_for_a_healthy_redis(services: dict[str, Any]) -> None:
    worker = services["worker"]
    replicas = (worker.get("deploy") or {}).get("replicas") or worker.get("scale")
    assert replicas is not None, "run more than one worker: deploy.replicas or scale"
    assert int(replicas) >= 2
    for name in APP_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["flower", "flower-rabbitmq"])
def test_flower_requires_basic_auth_from_the_environment(
    services: dict[str, Any], name: str
) -> None:
    """The password is required, and given in the environment: a command line is public."""
    command = command_of(services[name])
    assert not [a for a in command if a.startswith("--basic-auth")], "never on the command line"
    user, _, password = environment_of(services[name])["FLOWER_BASIC_AUTH"].partition("}:")
    assert user.startswith("${FLOWER_USER")
    assert password.startswith("${FLOWER_PASSWORD:?"), "the password must be required"
    assert any("5555" in str(port) for port in services[name]["ports"])


@pytest.mark.parametrize("name", ["flower", "flower-rabbitmq"])
def test_flower_loads_the_shipped_settings(services: dict[str, Any], name: str) -> None:
    """``--conf=config/flowerconfig.py``, a file the image has (the Dockerfile copies config/)
    and that sets the task list's columns, the governance reason (result) among them."""
    confs = [a for a in command_of(services[name]) if a.startswith("--conf=")]
    assert confs == ["--conf=config/flowerconfig.py"]
    path = ROOT / confs[0].removeprefix("--conf=")
    settings: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), settings)
    assert "result" in settings["tasks_columns"].split(",")
    assert "basic_auth" not in settings, "basic auth comes from the environment"
    assert "COPY config ./config" in DOCKERFILE.read_text()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_services_use_the_shared_redis_and_required_secrets(
    services: dict[str, Any], name: str
) -> None:
    env = environment_of(services[name])
    assert env["GOVERNANCE_BROKER_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
    assert env["GOVERNANCE_STATE_REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/1"
    assert env["GOVERNANCE_REQUIRE_SECRETS"].lower() == "true"
    for secret in SECRETS:
        assert re.fullmatch(rf"\$\{{{secret}:\?[^}}]*\}}", env[secret]), (
            f"{name}: {secret} must be required with ${{{secret}:?...}}, got {env[secret]!r}"
        )


def test_no_secret_has_a_default() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    for secret in (*SECRETS, "FLOWER_PASSWORD", "REDIS_PASSWORD"):
        uses = re.findall(rf"\$\{{{secret}([^}}]*)\}}", text)
        assert uses, f"{secret} is not used"
        assert all(use.startswith(":?") for use in uses), f"{secret} must use :? ({uses})"


def test_the_dockerfile_installs_the_project_and_runs_a_worker() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]
    instructions = [line for line in instructions if not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    runs = " ".join(line for line in instructions if line.startswith("RUN "))
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), "pip install . (the project)"
    assert "[dev]" not in runs, "no dev extras in the image"
    assert any(re.match(r"COPY config\b", line) for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users, "run as a non-root user"
    assert users[-1] not in ("root", "0"), "run as a non-root user"
    cmd = [line for line in instructions if line.startswith("CMD ")]
    assert cmd, "a default command"
    argv = json.loads(cmd[-1].removeprefix("CMD "))
    assert argv[:4] == ["celery", "-A", "workers.app", "worker"]
    check_entry_point(argv)


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for entry in (".venv", ".git", ".redis-data", ".demo", "**/__pycache__", ".pytest_cache"):
        assert entry in ignored


# ------------------------------------------------------------------ the rabbitmq profile


def expand(text: str, variables: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME:?message}`` / ``${NAME}`` with ``variables``."""

    def one(match: re.Match[str]) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        value = variables.get(name, "")
        if value or operator not in (":-", "-"):
            return value
        return rest

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, text)


def test_the_rabbitmq_profile_adds_a_broker_workers_and_flower(services: dict[str, Any]) -> None:
    for name in (RABBITMQ_PROFILE, *RABBITMQ_APP_SERVICES):
        assert services[name].get("profiles") == [RABBITMQ_PROFILE], name
    for name in ("redis", *APP_SERVICES):
        assert "profiles" not in services[name], f"{name} must run without any profile"


def test_rabbitmq_is_official_persistent_and_health_checked(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    rabbitmq = services["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:[34][\w.\-]*-management", rabbitmq["image"]), (
        "the official image, with the management plugin (Flower's broker API)"
    )
    assert rabbitmq["hostname"], "a fixed hostname: the node name names the data directory"
    volume, _, target = rabbitmq["volumes"][0].partition(":")
    assert target == "/var/lib/rabbitmq"
    assert volume in (compose.get("volumes") or {}), "a named volume, declared at the top"
    test = rabbitmq["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1] == "rabbitmq-diagnostics"
    for port in rabbitmq.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), "the management UI only on the host's loopback"


def test_rabbitmq_has_its_own_user_with_a_password(services: dict[str, Any]) -> None:
    """guest may only log in from localhost, so the workers need a user of their own."""
    env = environment_of(services["rabbitmq"])
    assert env["RABBITMQ_DEFAULT_USER"] == "${RABBITMQ_USER:-governance}"
    assert env["RABBITMQ_DEFAULT_PASS"] == "${RABBITMQ_PASSWORD:-}"


def test_the_rabbitmq_password_is_never_defaulted() -> None:
    """Empty, never a usable default: ``:?`` would make plain ``docker compose up`` demand it."""
    uses = re.findall(r"\$\{RABBITMQ_PASSWORD([^}]*)\}", COMPOSE.read_text(encoding="utf-8"))
    assert uses
    assert set(uses) == {":-"}, uses


@pytest.mark.parametrize(("password", "starts"), [("", False), ("s3cret", True)])
def test_rabbitmq_refuses_to_start_without_a_password(
    services: dict[str, Any], tmp_path: Path, password: str, starts: bool
) -> None:
    """Run the service's entry point here, with a stand-in for the image's own script."""
    rabbitmq = services["rabbitmq"]
    entrypoint = [part.replace("$$", "$") for part in rabbitmq["entrypoint"]]  # compose's escape
    (tmp_path / "docker-entrypoint.sh").write_text('#!/bin/sh\necho "image entry point: $*"\n')
    (tmp_path / "docker-entrypoint.sh").chmod(0o755)
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}",
        "RABBITMQ_DEFAULT_PASS": password,
    }
    result = subprocess.run(
        [*entrypoint, *command_of(rabbitmq)],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if starts:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "image entry point: rabbitmq-server"
    else:
        assert result.returncode != 0
        assert "set RABBITMQ_PASSWORD" in result.stderr
        assert "image entry point" not in result.stdout


@pytest.mark.parametrize("name", RABBITMQ_APP_SERVICES)
def test_rabbitmq_services_name_entry_points_that_exist(
    services: dict[str, Any], name: str
) -> None:
    check_entry_point(command_of(services[name]))


def test_the_rabbitmq_worker_and_flower_match_the_redis_ones(services: dict[str, Any]) -> None:
    assert command_of(services["worker-rabbitmq"]) == command_of(services["worker"])
    assert services["worker-rabbitmq"]["deploy"]["replicas"] >= 2
    flower = command_of(services["flower-rabbitmq"])
    redis_flower = command_of(services["flower"])
    assert flower[: len(redis_flower)] == redis_flower, "the same Flower, basic auth included"


def test_the_published_host_ports_do_not_clash(services: dict[str, Any]) -> None:
    """Every profile on: each host port is published once."""
    published = [
        str(port).rsplit(":", 1)[0]
        for service in services.values()
        for port in service.get("ports", [])
    ]
    assert len(published) == len(set(published)), published


@pytest.mark.parametrize("name", RABBITMQ_APP_SERVICES)
def test_rabbitmq_services_use_the_broker_and_keep_state_in_redis(
    services: dict[str, Any], name: str
) -> None:
    service = services[name]
    env = environment_of(service)
    broker = expand(env["GOVERNANCE_BROKER_URL"], RABBITMQ_VARIABLES)
    assert broker == "amqp://governance:s3cret@rabbitmq:5672//"
    parts = url_to_parts(broker)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("amqp", "rabbitmq", 5672, "/")
    assert (parts.username, parts.password) == ("governance", "s3cret")
    app = Celery("compose-check", broker=broker, backend=env["GOVERNANCE_RESULT_BACKEND"])
    try:
        assert app.connection_for_write().transport.driver_type == "amqp"  # no connection made
    finally:
        app.close()
    # Governance state stays in the Redis service, shared with the Redis-broker workers;
    # results go to Redis too (Celery 5 has no amqp:// result backend).
    assert env["GOVERNANCE_STATE_REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/1"
    backend = env["GOVERNANCE_RESULT_BACKEND"]
    assert backend.startswith(f"redis://:{REDIS_PASSWORD}@redis:6379/")
    assert backend.rsplit("/", 1)[1] not in ("0", "1")
    assert env["GOVERNANCE_REQUIRE_SECRETS"].lower() == "true"
    for secret in SECRETS:
        assert re.fullmatch(rf"\$\{{{secret}:\?[^}}]*\}}", env[secret]), (name, secret)
    for dependency in ("redis", "rabbitmq"):
        assert service["depends_on"][dependency]["condition"] == "service_healthy"


def test_flower_on_rabbitmq_reads_the_management_api(services: dict[str, Any]) -> None:
    command = command_of(services["flower-rabbitmq"])
    assert not [a for a in command if a.startswith("--broker-api")], "credentials: environment"
    raw = environment_of(services["flower-rabbitmq"])["FLOWER_BROKER_API"]
    api = urlsplit(expand(raw, RABBITMQ_VARIABLES))
    assert (api.scheme, api.hostname, api.port, api.path) == ("http", "rabbitmq", 15672, "/api/")
    assert (api.username, api.password) == ("governance", "s3cret")


# ------------------------------------------------------------------ nothing exposed, govctl


def _published(services: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (name, str(port)) for name, service in services.items() for port in service.get("ports", [])
    ]


def test_every_published_port_binds_the_hosts_loopback(services: dict[str, Any]) -> None:
    """Flower's basic auth travels in plain HTTP, usage per tenant is not public: nothing
    listens on the host's other interfaces (an SSH tunnel or a TLS proxy reaches them)."""
    published = _published(services)
    assert {name for name, _ in published} >= {"flower", "metrics", "flower-rabbitmq"}
    for name, port in published:
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        assert port.count(":") == 2, f"{name}: host address, host port, container port ({port})"


def test_flower_listens_on_loopback_unless_told_otherwise() -> None:
    settings: dict[str, Any] = {}
    path = ROOT / "config" / "flowerconfig.py"
    saved = os.environ.pop("FLOWER_ADDRESS", None)
    try:
        exec(compile(path.read_text(), str(path), "exec"), settings)
    finally:
        if saved is not None:
            os.environ["FLOWER_ADDRESS"] = saved
    assert settings["address"] == "127.0.0.1"
    assert callable(settings["format_task"])


def test_govctl_runs_against_the_deployment_with_no_key_of_its_own(
    services: dict[str, Any],
) -> None:
    govctl = services["govctl"]
    assert govctl["profiles"] == ["tools"], "run on demand, never by `docker compose up`"
    assert govctl["entrypoint"] == ["govctl"]
    check_entry_point([*govctl["entrypoint"], *command_of(govctl)])
    env = environment_of(govctl)
    assert env == environment_of(services["worker"]), "the workers' settings, nothing more"
    assert "GOVERNANCE_REVIEWER_KEY" not in env
    assert not govctl.get("volumes"), "no key in the service: a reviewer mounts theirs per run"
    assert govctl["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in govctl


def test_the_documented_govctl_commands_use_the_service() -> None:
    """docs/operating.md says how: one run, the key mounted read-only as the reviewer's user."""
    docs = (ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    assert "docker compose run --rm govctl held list" in docs
    approve = re.search(
        r'docker compose run --rm --user ("[^"]+") -v ("[^"]+") govctl held approve', docs
    )
    assert approve is not None, "docs/operating.md: how a reviewer approves with compose"
    user, volume = approve.groups()
    assert user == '"$(id -u):$(id -g)"', "as the reviewer, who can read the key (mode 0600)"
    assert volume.endswith(':ro"'), "the key mounted read-only"


def test_the_shipped_policy_holds_no_example_reviewer_keys() -> None:
    """The image's policy (config/, copied by the Dockerfile) lists no reviewer whose private
    key nobody has: an operator adds theirs (govctl reviewers keygen)."""
    assert "COPY config ./config" in DOCKERFILE.read_text(encoding="utf-8")
    policy = yaml.safe_load((ROOT / "config" / "governance.yaml").read_text(encoding="utf-8"))
    sections = [policy.get("defaults") or {}, *(policy.get("tenants") or {}).values()]
    assert [section.get("reviewers") or {} for section in sections] == [{}] * len(sections)
    text = (ROOT / "config" / "governance.yaml").read_text(encoding="utf-8")
    code = [line.split("#", 1)[0] for line in text.splitlines()]
    assert "ed25519:" not in "".join(code)
