"""A clock the shared-service tests control: every `now` is passed explicitly."""

from __future__ import annotations

from datetime import datetime

import pytest

from shared.core.models import utcnow


@pytest.fixture
def t0() -> datetime:
    """The moment each test's first message is accepted (whole seconds, aware UTC)."""
    return utcnow().replace(microsecond=0)
