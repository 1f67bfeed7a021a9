"""The Dockerfile, read as text (no Docker engine here to build it): what the compose file and the
manifests rely on, and what keeps the image small and safe."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from tests.deploy.support import ROOT, image_user_id

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(?:\s*#.*\n)*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def stages(text: str) -> list[list[Instruction]]:
    """The instructions of each build stage, in order (FROM opens one)."""
    split: list[list[Instruction]] = []
    for instruction in instructions(text):
        if instruction[0] == "FROM":
            split.append([])
        if split:
            split[-1].append(instruction)
    return split


@pytest.fixture(scope="module")
def dockerfile() -> list[list[Instruction]]:
    return stages((ROOT / "Dockerfile").read_text())


def runs(stage: list[Instruction]) -> str:
    return "\n".join(arguments for keyword, arguments in stage if keyword == "RUN")


def test_the_entrypoint_is_sms_dispatch(dockerfile: list[list[Instruction]]) -> None:
    final = dict(dockerfile[-1])
    assert json.loads(final["ENTRYPOINT"]) == ["sms-dispatch"]
    assert json.loads(final["CMD"]) == ["api"]


def test_the_final_stage_runs_as_a_numeric_non_root_user(
    dockerfile: list[list[Instruction]],
) -> None:
    user = dict(dockerfile[-1])["USER"]
    assert user == "${APP_UID}:${APP_UID}"
    assert image_user_id() > 0


def test_dependencies_come_only_from_the_hashed_lock(dockerfile: list[list[Instruction]]) -> None:
    build = runs(dockerfile[0])
    assert "pip install --require-hashes -r /app/requirements.lock" in build
    assert re.search(r"pip install --no-deps --editable /app\b", build)


def test_the_final_stage_installs_nothing(dockerfile: list[list[Instruction]]) -> None:
    assert len(dockerfile) >= 2
    final = runs(dockerfile[-1])
    for tool in ("apt-get", "pip ", "gcc", "build-essential", "apk "):
        assert tool not in final, f"the final stage runs {tool.strip()}"
    copied = [arguments for keyword, arguments in dockerfile[-1] if keyword == "COPY"]
    assert copied, "nothing copied from the build stage"
    assert all(arguments.startswith("--from=build ") for arguments in copied)


def copied_sources(stage: list[Instruction]) -> set[str]:
    """What a stage COPYs from the build context (not from another stage)."""
    return {
        source
        for keyword, arguments in stage
        if keyword == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    }


def test_every_package_and_the_migrations_are_copied(dockerfile: list[list[Instruction]]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    # `sms-dispatch migrate` reads alembic.ini and migrations/ from beside the packages.
    needed = packages | {"migrations", "alembic.ini", "requirements.lock", "pyproject.toml"}
    assert needed <= copied_sources(dockerfile[0])


def test_the_build_context_is_an_allow_list_of_what_the_image_copies(
    dockerfile: list[list[Instruction]],
) -> None:
    # Nothing else (a .env, a local database, the virtual environment) is ever sent to the build.
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    included = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert included == copied_sources(dockerfile[0])
    assert "**/.env" in patterns
