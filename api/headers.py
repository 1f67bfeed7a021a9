"""What every Interact endpoint shares: paths, headers and the documented answers."""

from __future__ import annotations

from typing import Annotated

from litestar.params import HeaderParameter

V2 = "/interact/version/2/account/{account_id:str}/resources"
V3 = "/interact/version/3/account/{account_id:str}/resources"

TenantId = Annotated[str | None, HeaderParameter(name="Tenant-Id", description="The account")]
ApplicationKey = Annotated[
    str | None,
    HeaderParameter(name="Application-Key", description="Public API Service application key"),
]
EnvironmentName = Annotated[
    str | None,
    HeaderParameter(
        name="Environment-Name", description="Environment; the account's default if absent"
    ),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description=(
            "Optional (at most 255 characters): a retried request with the same key "
            "gets the first answer again"
        ),
    ),
]

MAX_IDEMPOTENCY_KEY = 255  # the column's width
