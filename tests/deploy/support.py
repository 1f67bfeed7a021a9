"""What the deployment tests share: where things are, and what the image and CLI promise."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from shared.cli import main

ROOT = Path(__file__).resolve().parents[2]

Json = dict[str, Any]


def subcommands() -> set[str]:
    """Every `sms-dispatch` subcommand, as click knows them (the image's entrypoint runs one)."""
    return set(main.commands)


def image_user_id() -> int:
    """The numeric user the Dockerfile's final stage runs as."""
    match = re.search(r"^ARG APP_UID=(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile declares no ARG APP_UID"
    return int(match.group(1))


def mapping(value: Any, where: str) -> Json:
    """`value`, which must be a YAML mapping (`where` names it in the failure)."""
    assert isinstance(value, dict), f"{where} is not a mapping: {value!r}"
    return value


def sequence(value: Any, where: str) -> list[Any]:
    """`value`, which must be a YAML sequence (`where` names it in the failure)."""
    assert isinstance(value, list), f"{where} is not a list: {value!r}"
    return value
