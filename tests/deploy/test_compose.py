"""docker-compose.yml, checked without a Docker engine: against the Compose Specification's own
JSON schema (as vendored by check-jsonschema), after the interpolation Compose does, and against
what the service needs: real subcommands, migrations first, health-gated start, no secrets."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from tests.deploy.support import ROOT, Json, mapping, sequence, subcommands

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt},
# ${NAME+alt}, $NAME, and $$ for a literal dollar: Compose's interpolation syntax.
REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
# A value that is nothing but one reference to a variable with no fallback value in the file.
SECRET_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\}$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|AUTH|(^|_)KEY($|_)")
URL_PASSWORD = re.compile(r"://[^:/@\s]*:(?P<password>\$\{[^}]*\}|[^@\s]*)@")
PLACEHOLDER = "change-me"

DATABASE_VARIABLES = ("SMSD_DATABASE_URL", "DATABASE_URL")
# The subcommands that open the database: whoever runs them must be pointed at PostgreSQL and
# must wait for the migrations (the default URL is a local SQLite file).
DATABASE_SUBCOMMANDS = {"api", "worker", "migrate", "seed-demo", "dev"}

EXPECTED_COMMANDS = {
    "migrate": "migrate",
    "api": "api",
    "worker": "worker",
    "worker-bulk": "worker",
    "beat": "beat",
    "flower": "flower",
    "simulator": "simulator",
}


def load_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines, as Compose reads a .env file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


def interpolate(value: Any, environment: dict[str, str]) -> Any:
    """`value` with every string interpolated as Compose does before it validates the file."""
    if isinstance(value, dict):
        return {key: interpolate(item, environment) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environment) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        operator, argument = match.group("operator") or "", match.group("argument") or ""
        current = environment.get(name)
        present, non_empty = current is not None, bool(current)
        if operator in ("?", ":?"):
            assert non_empty if operator == ":?" else present, f"{name}: {argument}"
        if operator in ("-", ":-"):
            return (current if (non_empty if operator == ":-" else present) else argument) or ""
        if operator in ("+", ":+"):
            return argument if (non_empty if operator == ":+" else present) else ""
        return current or ""

    return REFERENCE.sub(substitute, value)


def strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string in `value` (keys excluded) with a dotted path to it."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from strings(item, f"{where}[{index}]")
    elif isinstance(value, str):
        yield where, value


def environment_of(service: Json) -> dict[str, str]:
    """A service's `environment`, in either of the two forms Compose accepts."""
    declared = service.get("environment") or {}
    if isinstance(declared, list):
        pairs = (str(item).partition("=") for item in declared)
        return {key: value for key, _, value in pairs}
    return {key: "" if value is None else str(value) for key, value in declared.items()}


def command_of(service: Json) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def is_ours(service: Json) -> bool:
    """Services built from ./Dockerfile run `sms-dispatch` (its entrypoint)."""
    return "build" in service


@pytest.fixture(scope="module")
def compose() -> Json:
    # PyYAML resolves the anchors and `<<` merge keys the file uses, as Compose does.
    return mapping(yaml.safe_load(COMPOSE_FILE.read_text()), "docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: Json) -> dict[str, Json]:
    found = mapping(compose.get("services"), "services")
    return {name: mapping(service, f"services.{name}") for name, service in found.items()}


@pytest.fixture(scope="module")
def example_environment() -> dict[str, str]:
    return load_env_file(ENV_EXAMPLE.read_text())


def test_the_file_follows_the_compose_specification(
    compose: Json, example_environment: dict[str, str]
) -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    assert schema.get("title") == "Compose Specification"
    validator = Draft202012Validator(schema)
    # Compose validates the model after interpolation: do the same, with .env.example as .env.
    errors = [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(interpolate(compose, example_environment))
    ]
    assert not errors, "\n".join(errors)


def test_a_broken_file_is_refused_by_the_schema() -> None:
    # The validation above is only worth something if it can fail.
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    validator = Draft202012Validator(json.loads(schema_file.read_text()))
    broken = {"services": {"api": {"image": "x", "depends_on": {"db": {"condition": "up"}}}}}
    assert list(validator.iter_errors(broken))


def test_every_service_of_the_service_is_there(services: dict[str, Json]) -> None:
    assert set(services) == {"postgres", "redis", *EXPECTED_COMMANDS}


def test_every_image_service_runs_a_real_sms_dispatch_subcommand(
    services: dict[str, Json],
) -> None:
    known = subcommands()
    for name, service in services.items():
        if not is_ours(service):
            continue
        command = command_of(service)
        assert command, f"{name} has no command: the image would run its default"
        assert command[0] in known, f"{name} runs `sms-dispatch {command[0]}`, no such subcommand"
        if name in EXPECTED_COMMANDS:
            assert command[0] == EXPECTED_COMMANDS[name], f"{name} runs {command[0]}"
    assert {name for name, service in services.items() if is_ours(service)} == set(
        EXPECTED_COMMANDS
    )


def test_each_lane_has_its_own_worker_service(services: dict[str, Json]) -> None:
    assert command_of(services["worker"])[:3] == ["worker", "--lane", "realtime"]
    assert command_of(services["worker-bulk"])[:3] == ["worker", "--lane", "bulk"]


def test_every_service_that_opens_the_database_is_pointed_at_postgres(
    services: dict[str, Json],
) -> None:
    for name, service in services.items():
        if is_ours(service) and command_of(service)[0] in DATABASE_SUBCOMMANDS:
            url = environment_of(service).get("SMSD_DATABASE_URL", "")
            assert url.startswith("postgresql://"), f"{name} would use the default SQLite file"
            assert "@postgres:" in url, f"{name} is not pointed at the postgres service: {url!r}"


def test_every_service_that_needs_the_database_waits_for_the_migrations(
    services: dict[str, Json],
) -> None:
    for name, service in services.items():
        needs_database = any(key in environment_of(service) for key in DATABASE_VARIABLES)
        if name == "migrate" or not needs_database:
            continue
        depends_on = mapping(service.get("depends_on"), f"{name}.depends_on")
        assert depends_on.get("migrate") == {"condition": "service_completed_successfully"}, name


def test_migrations_run_once_after_postgres_is_healthy(services: dict[str, Json]) -> None:
    migrate = services["migrate"]
    assert str(migrate.get("restart")) == "no"
    assert migrate.get("depends_on") == {"postgres": {"condition": "service_healthy"}}


def test_every_long_running_service_has_a_health_check(services: dict[str, Json]) -> None:
    for name, service in services.items():
        if name == "migrate":
            continue
        test = mapping(service.get("healthcheck"), f"{name}.healthcheck").get("test")
        assert sequence(test, f"{name}.healthcheck.test")[0] in ("CMD", "CMD-SHELL"), name


def test_every_dependency_waits_for_health_or_completion(services: dict[str, Json]) -> None:
    for name, service in services.items():
        for dependency, condition in mapping(service.get("depends_on") or {}, name).items():
            expected = (
                "service_completed_successfully" if dependency == "migrate" else "service_healthy"
            )
            assert mapping(condition, f"{name}.depends_on.{dependency}") == {
                "condition": expected
            }, f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency] or dependency == "migrate", dependency


def test_redis_keeps_the_queue_on_disk(services: dict[str, Json]) -> None:
    redis = services["redis"]
    command = command_of(redis)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(str(volume).endswith(":/data") for volume in redis.get("volumes", []))


def test_published_ports_bind_to_loopback_only(
    services: dict[str, Json], example_environment: dict[str, str]
) -> None:
    published = 0
    for name, service in services.items():
        for port in interpolate(service.get("ports", []), example_environment):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
    assert published, "nothing is published: the API would be unreachable"
    assert "ports" not in services["postgres"]
    assert "ports" not in services["redis"]


def test_no_secret_value_is_written_in_the_file(compose: Json) -> None:
    for where, value in strings(compose):
        variable = where.rpartition(".")[2]
        if ".environment." in f".{where}" and SECRET_NAME.search(variable):
            assert SECRET_REFERENCE.match(value), f"{where} holds a value, not ${{VARIABLE}}"
        for match in URL_PASSWORD.finditer(value):
            assert SECRET_REFERENCE.match(match.group("password")), f"{where}: password in URL"
        for reference in REFERENCE.finditer(value):
            name = reference.group("braced") or reference.group("named") or ""
            if SECRET_NAME.search(name):
                assert reference.group("operator") in (None, "?", ":?"), (
                    f"{where}: ${{{name}}} falls back to a value written in the file"
                )
    # The one secret passed on a command line: Redis's password.
    redis_command = command_of(compose["services"]["redis"])
    assert SECRET_REFERENCE.match(redis_command[redis_command.index("--requirepass") + 1])


def test_every_required_variable_is_in_env_example_as_a_placeholder(
    compose: Json, example_environment: dict[str, str]
) -> None:
    required = {
        match.group("braced")
        for _, value in strings(compose)
        for match in REFERENCE.finditer(value)
        if match.group("braced") and match.group("operator") in (None, "?", ":?")
    }
    assert required, "no variable comes from .env"
    missing = required - set(example_environment)
    assert not missing, f".env.example lacks {sorted(missing)}"
    for name in required:
        if SECRET_NAME.search(name):
            assert PLACEHOLDER in example_environment[name], f"{name} is not a placeholder"


def test_the_env_file_is_never_committed() -> None:
    ignored = subprocess.run(["git", "check-ignore", "--quiet", ".env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, ".env is not in .gitignore"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", ".env"], cwd=ROOT, capture_output=True, check=False
    )
    assert tracked.returncode != 0, ".env is committed"


def test_the_interpolation_reads_like_compose() -> None:
    environment = {"SET": "value", "EMPTY": ""}
    assert interpolate("${SET}-${UNSET:-d}-${EMPTY:-d}-${EMPTY-d}-$$HOME", environment) == (
        "value-d-d--$HOME"
    )
    assert interpolate("${SET:+alt}${UNSET:+alt}", environment) == "alt"
    with pytest.raises(AssertionError, match="UNSET: set it"):
        interpolate("${UNSET:?set it}", environment)
