"""The operator documentation keeps up with the code."""

from __future__ import annotations

from pathlib import Path

from shared.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_operations_guide() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    missing = [
        f"SMSD_{name.upper()}"
        for name in Settings.model_fields
        if f"`SMSD_{name.upper()}`" not in guide
    ]
    assert missing == []
