"""The deployable stack: ``docker-compose.yml``, the ``Dockerfile`` and ``deploy/`` (README.md, "Run
the full stack").

No Docker engine runs here or in CI, so the files are checked instead of run:

- the compose file is valid against the Compose Specification's JSON schema (``tests/data``, with
  anchors and merge keys resolved and ``${VAR:-default}`` interpolated the way Compose does);
- every ``DATAPORT_*`` variable it (or the Dockerfile) sets is a field of ``Settings``, the settings
  build from exactly the environment the api and the workers get, and the values the stack needs
  are there and agree with the other services (bucket, credentials, webhook secret, ports);
- the commands the image and the services run are real ``dataport`` subcommands with real options;
- ``deploy/datasets.toml`` loads with the project's loader from the compose environment, and the
  table and the index that ``deploy/`` creates have exactly the declared columns (on real PostgreSQL
  and OpenSearch-compatible servers, as the other tests use).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import psycopg
import pytest
import typer
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dataport.cli import app as cli_app
from dataport.settings import Settings
from sources.registry import load_datasets_file

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DATASETS_FILE = ROOT / "deploy" / "datasets.toml"
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"

DATAPORT_SERVICES = ("api", "worker")
MAIL_SETTINGS = ("smtp_host", "smtp_port", "smtp_tls", "mail_from")
# DATAPORT_* variables read outside Settings (checked below to be read where they are said to be).
OUTSIDE_SETTINGS = {"DATAPORT_LOG_LEVEL": "dataport/cli.py"}


# --------------------------------------------------------------------------------------------
# Reading the compose file as Compose does


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, environ: Mapping[str, str], used: dict[str, bool] | None = None) -> str:
    """Compose's ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``,
    ``${VAR:+alt}`` and ``$$``. ``used`` collects each variable and whether it has a default."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"]
        if used is not None:
            used[name] = used.get(name, False) or op in (":-", "-")
        present = name in environ
        current = environ.get(name, "")
        if op in (":-", "-"):
            return current if (current if op == ":-" else present) else arg
        if op in (":?", "?"):
            if not (current if op == ":?" else present):
                raise ValueError(f"${{{name}}} is required: {arg}")
            return current
        if op in (":+", "+"):
            return arg if (current if op == ":+" else present) else ""
        return current

    return _VARIABLE.sub(substitute, value)


def _interpolate_tree(node: Any, environ: Mapping[str, str], used: dict[str, bool]) -> Any:
    if isinstance(node, str):
        return interpolate(node, environ, used)
    if isinstance(node, list):
        return [_interpolate_tree(item, environ, used) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, environ, used) for key, value in node.items()}
    return node


def load_compose(environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, bool]]:
    """The compose file with anchors and merge keys resolved (PyYAML does both) and variables
    interpolated from ``environ`` (default: none set, so every default applies); and the variables
    it uses, each with whether it has a default."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    used: dict[str, bool] = {}
    return _interpolate_tree(raw, environ or {}, used), used


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()[0]


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as a dict of strings (the list form ``KEY=VALUE`` too)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {
        key: "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in env.items()
    }


def command(service: Mapping[str, Any], key: str = "command") -> list[str]:
    value = service.get(key) or []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def bind_mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (short syntax, relative to the repo)."""
    mounts = {}
    for volume in service.get("volumes") or []:
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def in_container(service: Mapping[str, Any], path: str) -> Path | None:
    """The host file behind ``path`` inside the service's container, if a bind mount provides it."""
    for target, source in bind_mounts(service).items():
        if path == target:
            return source
        if path.startswith(target.rstrip("/") + "/"):
            return source / path[len(target.rstrip("/")) + 1 :]
    return None


def settings_from(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``Settings`` built the way the containers build it: from these environment variables alone."""
    for name in list(os.environ):  # the test servers' DATAPORT_TEST_* URLs are no settings: kept
        if name.upper().startswith("DATAPORT_") and not name.upper().startswith("DATAPORT_TEST_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def dataport_variables(env: Mapping[str, str]) -> set[str]:
    return {name for name in env if name.startswith("DATAPORT_")}


def setting_name(variable: str) -> str:
    return variable.removeprefix("DATAPORT_").lower()


# --------------------------------------------------------------------------------------------
# (a) The Compose Specification


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator: jsonschema.Draft7Validator, document: Any) -> dict[str, str]:
    """Path in the document -> message, for every schema error."""
    return {"/".join(map(str, e.absolute_path)) or "(top)": e.message for e in validator.iter_errors(document)}


def test_the_compose_file_is_valid_against_the_compose_specification(validator, compose):
    assert _errors(validator, compose) == {}


def test_the_schema_catches_a_broken_compose_file(validator, compose):
    """The check above has teeth: misspelt keys and wrong types are refused."""
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    broken["services"]["worker"]["deploy"] = {"replica": 2}
    broken["services"]["redis"]["volumes"] = {"redis-data": "/data"}
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "service_ready"
    errors = _errors(validator, broken)
    assert "'helthcheck'" in errors["services/api"]
    assert "'replica'" in errors["services/worker/deploy"]
    assert "is not of type 'array'" in errors["services/redis/volumes"]
    assert set(errors) == {
        "services/api",
        "services/api/depends_on",
        "services/worker/deploy",
        "services/redis/volumes",
    }


def test_every_variable_the_compose_file_reads_has_a_default():
    """``docker compose up`` works with no .env file; variables only override."""
    _, used = load_compose()
    assert used, "the compose file reads no variables; update this test"
    assert sorted(name for name, has_default in used.items() if not has_default) == []


def test_setting_a_variable_overrides_its_default():
    compose, _ = load_compose({"DATAPORT_JWT_SECRET": "from-the-shell", "MINIO_ROOT_PASSWORD": "pw-from-env"})
    api, minio = compose["services"]["api"], compose["services"]["minio"]
    assert environment(api)["DATAPORT_JWT_SECRET"] == "from-the-shell"
    assert environment(api)["DATAPORT_S3_SECRET_ACCESS_KEY"] == "pw-from-env"
    assert environment(minio)["MINIO_ROOT_PASSWORD"] == "pw-from-env"


def test_services_and_their_dependencies_fit_together(services):
    assert {"api", "worker", "redis", "postgres", "opensearch", "minio", "minio-setup", "mailpit"} <= set(services)
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            target = services[dependency]
            if spec["condition"] == "service_healthy":
                check = target.get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), f"{dependency} has no health check"
            if spec["condition"] == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dependency} is a one-shot: it must not restart"
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}, which does not exist"
            assert ROOT in source.parents, f"{name} mounts {source} from outside the repository"


def test_the_dataport_services_share_image_environment_and_datasets(services):
    api, worker = services["api"], services["worker"]
    assert api["build"] == worker["build"] == "." and api["image"] == worker["image"]
    assert environment(api) == environment(worker)
    assert worker["deploy"]["replicas"] == 2
    assert worker["healthcheck"] == {"disable": True}  # the image's check asks /healthz, which a worker lacks
    assert "ports" not in worker


def test_backing_services_are_configured_as_asked(services):
    redis = services["redis"]
    assert command(redis)[:1] == ["redis-server"]
    assert " ".join(command(redis)).count("--appendonly yes") == 1
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"])

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert any(str(v).split(":")[1] == "/var/lib/postgresql/data" for v in postgres["volumes"])
    assert "pg_isready" in postgres["healthcheck"]["test"]

    opensearch = services["opensearch"]
    env = environment(opensearch)
    assert env["discovery.type"] == "single-node" and env["DISABLE_SECURITY_PLUGIN"] == "true"
    heap = re.search(r"-Xmx(\d+)([mg])", env["OPENSEARCH_JAVA_OPTS"])
    heap_mib = int(heap[1]) * (1024 if heap[2] == "g" else 1)
    limit = opensearch["deploy"]["resources"]["limits"]["memory"]
    limit_mib = int(limit[:-1]) * (1024 if limit[-1] in "gG" else 1)
    assert 256 <= heap_mib <= limit_mib // 2, "the heap must leave the node off-heap memory and page cache"

    minio = services["minio"]
    assert command(minio)[:2] == ["server", "/data"] and "--console-address" in command(minio)
    published = {str(p).rsplit(":", 1)[-1] for p in minio["ports"]}
    assert {"9000", "9001"} <= published

    mailpit = services["mailpit"]
    assert mailpit["image"].startswith("axllent/mailpit")
    assert {str(p).rsplit(":", 1)[-1] for p in mailpit["ports"]} == {"8025"}


# --------------------------------------------------------------------------------------------
# (b) Settings


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _dockerfile_env() -> dict[str, str]:
    """ENV of the final stage (KEY=VALUE form)."""
    stages: list[list[tuple[str, str]]] = []
    for instruction, argument in _dockerfile_instructions():
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, argument))
    env: dict[str, str] = {}
    for instruction, argument in stages[-1]:
        if instruction == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(argument))
    return env


@pytest.mark.parametrize("service", DATAPORT_SERVICES)
def test_every_dataport_variable_is_a_setting(services, service):
    fields = set(Settings.model_fields)
    env = environment(services[service])
    unknown = sorted(v for v in dataport_variables(env) - set(OUTSIDE_SETTINGS) if setting_name(v) not in fields)
    assert unknown == [], f"not fields of Settings: {unknown}"


def test_the_image_sets_only_real_settings():
    env = _dockerfile_env()
    assert env["DATAPORT_DATA_DIR"] == "/data"
    assert [v for v in dataport_variables(env) if setting_name(v) not in Settings.model_fields] == []


def test_variables_read_outside_settings_are_read_there():
    for variable, where in OUTSIDE_SETTINGS.items():
        assert variable in (ROOT / where).read_text()


@pytest.mark.parametrize("service", DATAPORT_SERVICES)
def test_mail_goes_to_mailpit(services, service, monkeypatch):
    env = environment(services[service])
    assert {f"DATAPORT_{name.upper()}" for name in MAIL_SETTINGS} <= set(env)
    settings = settings_from(env, monkeypatch)
    assert settings.smtp_host == "mailpit" and int(settings.smtp_port) == 1025
    assert settings.smtp_tls == "none"  # Mailpit speaks plain SMTP
    assert "@" in str(settings.mail_from)


@pytest.mark.parametrize("service", DATAPORT_SERVICES)
def test_the_settings_build_from_the_compose_environment(services, service, monkeypatch):
    settings = settings_from(environment(services[service]), monkeypatch)
    assert settings.storage == "s3"
    assert settings.jwt_secret, "api and workers must share a signing secret (else each makes its own)"
    assert settings.dev_mode is False


def test_the_stack_wires_storage_queue_and_events_together(services, monkeypatch):
    api_env = environment(services["api"])
    settings = settings_from(api_env, monkeypatch)
    minio, setup = environment(services["minio"]), environment(services["minio-setup"])

    # Redis: the compose service, with the append-only file on.
    redis = urlsplit(settings.redis_url)
    assert redis.scheme == "redis" and redis.hostname == "redis" and (redis.port or 6379) == 6379

    # S3: MinIO's endpoint, credentials and the bucket minio-setup creates; no SSE header (no KMS).
    endpoint = urlsplit(settings.s3_endpoint_url)
    assert endpoint.hostname == "minio" and endpoint.port == 9000
    assert (settings.s3_access_key_id, settings.s3_secret_access_key) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    assert setup["MINIO_ROOT_USER"] == minio["MINIO_ROOT_USER"]
    assert setup["MINIO_ROOT_PASSWORD"] == minio["MINIO_ROOT_PASSWORD"]
    assert settings.s3_bucket == setup["BUCKET"]
    assert settings.s3_sse == ""
    assert len(minio["MINIO_ROOT_USER"]) >= 3 and len(minio["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO's minimums

    # The bucket notification: a webhook target on MinIO whose id minio-setup subscribes, pointing
    # at the api's POST /storage-events with the api's shared secret as its token.
    target = setup["WEBHOOK_ID"]
    assert minio[f"MINIO_NOTIFY_WEBHOOK_ENABLE_{target}"] == "on"
    webhook = urlsplit(minio[f"MINIO_NOTIFY_WEBHOOK_ENDPOINT_{target}"])
    api_command = command(services["api"])
    api_port = int(api_command[api_command.index("--port") + 1])
    assert (webhook.hostname, webhook.port, webhook.path) == ("api", api_port, "/storage-events")
    token = minio[f"MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_{target}"]
    assert settings.storage_events_secret and token == settings.storage_events_secret
    assert len(token.split()) == 1, "MinIO prefixes 'Bearer ' only to a one-word token"
    assert minio[f"MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_{target}"].startswith("/")

    # minio-setup runs its script from a mounted folder, against the bucket and target above.
    entrypoint = command(services["minio-setup"], "entrypoint")
    script = in_container(services["minio-setup"], entrypoint[-1])
    assert script is not None and script.is_file()
    text = script.read_text()
    assert 'mc mb --ignore-existing "local/$BUCKET"' in text
    event = next(line for line in text.splitlines() if line.startswith("mc event add"))
    assert "--event put" in event and '"arn:minio:sqs::$WEBHOOK_ID:webhook"' in event
    prefix = re.search(r"--prefix (\S+)", event)[1]
    from tasks.imports import object_key

    assert object_key("alice", "a" * 24, "rows.csv").startswith(prefix), "uploads must fall under the prefix"
    assert setup["MINIO_URL"] == f"http://minio:{endpoint.port}"

    # Public address: the api's published port.
    published = {str(p).rsplit(":", 1)[-1] for p in services["api"]["ports"]}
    assert str(api_port) in published and urlsplit(settings.public_url).port == api_port


async def test_the_routes_the_stack_calls_exist(services, monkeypatch):
    """/healthz answers without Redis or storage (the health check), and /storage-events exists for
    POST only: MinIO's liveness probe of its webhook target (a HEAD) gets 405, which counts as up."""
    import httpx

    from api.app import create_app

    app = create_app(settings_from(environment(services["api"]), monkeypatch))
    # The app called directly, without its lifespan: nothing is connected.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api:8000") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.head("/storage-events")).status_code == 405
        assert (await client.get("/no-such-route")).status_code == 404
    checks = [" ".join(services["api"]["healthcheck"]["test"]), _dockerfile_cmd("HEALTHCHECK")]
    for check in checks:
        assert "http://127.0.0.1:8000/healthz" in check


# --------------------------------------------------------------------------------------------
# (c) Commands


def _dockerfile_cmd(instruction: str = "CMD") -> str:
    return [argument for name, argument in _dockerfile_instructions() if name == instruction][-1]


def _check_cli(argv: list[str]) -> None:
    """``argv`` parses as the ``dataport`` console script would parse it (subcommand and options),
    without running anything."""
    import click

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] == "dataport" and scripts["dataport"] == "dataport.cli:app"
    group = typer.main.get_command(cli_app)
    parent = click.Context(group, info_name="dataport")
    sub = group.get_command(parent, argv[1])
    assert sub is not None, f"no such subcommand: {argv[1]}"
    try:
        sub.make_context(argv[1], list(argv[2:]), parent=parent)
    except click.UsageError as e:
        pytest.fail(f"{' '.join(argv)}: {e}")


def test_the_images_default_command_runs_the_api_on_all_interfaces():
    argv = json.loads(_dockerfile_cmd())  # exec form
    _check_cli(argv)
    assert argv[1] == "api" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert "EXPOSE 8000" in DOCKERFILE.read_text() and argv[argv.index("--port") + 1] == "8000"


@pytest.mark.parametrize(("service", "subcommand"), [("api", "api"), ("worker", "worker")])
def test_the_service_commands_are_dataport_subcommands(services, service, subcommand):
    argv = command(services[service])
    _check_cli(argv)
    assert argv[1] == subcommand


def test_the_readme_commands_for_the_stack_parse():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the full stack", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"docker compose exec (\S+) (dataport [^`\n]*)", section)
    assert commands, "README.md, 'Run the full stack', shows no `docker compose exec api dataport ...`"
    for service, line in commands:
        assert service in DATAPORT_SERVICES
        _check_cli(shlex.split(line))


def test_the_cli_really_has_those_subcommands():
    """Through the module the console script calls, in a fresh interpreter."""
    for subcommand, options in (("api", ("--host", "--port")), ("worker", ()), ("token", ("USER",))):
        result = subprocess.run(
            [sys.executable, "-m", "dataport.cli", subcommand, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert result.returncode == 0, result.stderr
        for option in options:
            assert option in result.stdout


def test_the_image_runs_as_a_user_and_installs_without_the_test_extra():
    instructions = _dockerfile_instructions()
    froms = [argument for name, argument in instructions if name == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    final = instructions[max(i for i, (name, _) in enumerate(instructions) if name == "FROM") :]
    users = [argument for name, argument in final if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    installs = [argument for name, argument in instructions if name == "RUN" and "pip install" in argument]
    assert installs and not any("[test]" in line or "-e " in line for line in installs)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".dataport", "bench", "tests", "**/__pycache__"} <= set(ignored)


# --------------------------------------------------------------------------------------------
# (d) The datasets of the stack


@pytest.fixture
def stack_datasets(services, monkeypatch):
    """deploy/datasets.toml loaded by the project's loader with the api's environment, from the
    path the api reads it at (the bind mount)."""
    api = services["api"]
    env = environment(api)
    settings = settings_from(env, monkeypatch)
    mounted = in_container(api, str(settings.datasets))
    assert mounted == DATASETS_FILE.resolve()
    return load_datasets_file(mounted, settings)


def test_the_datasets_file_loads_without_reaching_any_store(stack_datasets):
    """Columns are declared: a "discover" would connect to hosts (postgres, opensearch) that do not
    resolve here and fail the load, as it would stop the api while a store is still starting."""
    sources = {name: dataset.source for name, dataset in stack_datasets.items()}
    assert sources == {"samples": "postgres", "field_notes": "opensearch"}
    for dataset in stack_datasets.values():
        assert dataset.importable and dataset.key and dataset.columns


def test_the_datasets_urls_come_from_the_compose_environment(services):
    document = tomllib.loads(DATASETS_FILE.read_text())
    variables = [entry["url"][4:] for entry in document["datasets"].values()]
    assert all(entry["url"].startswith("env:") for entry in document["datasets"].values())
    for service in DATAPORT_SERVICES:
        env = environment(services[service])
        assert [v for v in variables if not env.get(v)] == []
    api = environment(services["api"])
    pg = conninfo_to_dict(api["SAMPLES_DATABASE_URL"])
    postgres = environment(services["postgres"])
    assert (pg["host"], pg["user"], pg["password"], pg["dbname"]) == (
        "postgres",
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    assert urlsplit(api["FIELD_NOTES_OPENSEARCH_URL"]).hostname == "opensearch"


@pytest.fixture
def fresh_database(postgres_url: str) -> Iterator[str]:
    """An empty database, as the postgres image's init scripts see it."""
    name = f"dataport_deploy_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(postgres_url)
    params["dbname"] = name
    try:
        yield make_conninfo(**params)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _declared(dataset, *attributes: str) -> dict[str, tuple]:
    return {c.name: tuple(getattr(c, a) for a in attributes) for c in dataset.columns}


def test_the_postgres_init_script_makes_the_samples_table(services, stack_datasets, fresh_database):
    from sources import postgres

    mounted = in_container(services["postgres"], "/docker-entrypoint-initdb.d")
    scripts = sorted(mounted.glob("*.sql"))
    assert scripts, "no init script in the folder mounted at /docker-entrypoint-initdb.d"
    dataset = stack_datasets["samples"]
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        for script in scripts:
            conn.execute(script.read_text())
        rows = conn.execute(f'SELECT count(*) FROM "{dataset.table}"').fetchone()[0]
    assert rows > 0
    discovered = postgres.discover_columns(fresh_database, dataset.table)
    found = {c.name: (c.type, c.required) for c in discovered}
    assert found == _declared(dataset, "type", "required")


def test_the_opensearch_setup_makes_the_field_notes_index(services, stack_datasets, opensearch_url):
    from opensearchpy import OpenSearch

    from sources import opensearch

    setup = services["opensearch-setup"]
    script = in_container(setup, command(setup, "entrypoint")[-1])
    assert script is not None and script.is_file()
    dataset = stack_datasets["field_notes"]
    body = json.loads((script.parent / f"{dataset.table}.json").read_text())  # the index, for OpenSearch
    index = f"deploy_{dataset.table}_{uuid.uuid4().hex[:8]}"  # the test server is shared
    client = OpenSearch(hosts=[opensearch_url])
    try:
        client.indices.create(index=index, body=body)
        discovered = opensearch.discover_columns(opensearch_url, index)
    finally:
        client.indices.delete(index=index, ignore_unavailable=True)
        client.close()
    found = {c.name: (c.type, c.filterable, c.sortable) for c in discovered}
    assert found == _declared(dataset, "type", "filterable", "sortable")
