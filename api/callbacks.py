"""Provider status callbacks: verified, stored raw, then applied through the one lifecycle."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
import msgspec
import structlog
from litestar import Request, post
from litestar.datastructures import State
from litestar.exceptions import ClientException, PermissionDeniedException
from litestar.params import HeaderParameter, QueryParameter

from api.openapi import documented, json_object, string, text
from api.placement import Placement
from shared.lifecycle import StatusReport, apply_status, find_sid
from shared.models import utcnow
from shared.providers.simulator import SIGNATURE_HEADER, SIMULATOR_STATUSES, verify_signature

log = structlog.get_logger(__name__)


@post(
    "/callbacks/simulator",
    summary="Simulator status callback",
    description="Delivery reports from the simulator provider, signed with the shared secret.",
    tags=["Provider callbacks"],
    status_code=204,
    operation_class=documented(
        body=json_object(
            ["id", "status"],
            id=string("The simulator's message id", "SIM0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
            status=string("queued, sending, sent, delivered, undelivered or failed", "delivered"),
            errorCode=string("The provider's error code, for failures"),
        ),
        errors={
            400: text("An unknown status", "missing or invalid parameter status"),
            403: text(
                f"Missing or wrong {SIGNATURE_HEADER} (nothing is applied)", "Invalid signature"
            ),
        },
    ),
)
async def simulator_callback(
    request: Request[object, object, State],
    message_sid: Annotated[
        str | None,
        QueryParameter(name="messageSid", description="Ours, set in the callback URL we gave"),
    ] = None,
    signature: Annotated[
        str | None,
        HeaderParameter(
            name=SIGNATURE_HEADER, description="Hex HMAC-SHA256 over the public URL + body"
        ),
    ] = None,
) -> None:
    placement: Placement = request.app.state.placement
    raw = await request.body()
    # Signed over the public URL the provider called, so it also verifies behind a proxy.
    public_url = placement.settings.public_base_url.rstrip("/") + request.url.path
    if request.url.query:
        public_url += "?" + request.url.query
    secret = placement.settings.simulator_signing_secret.get_secret_value()
    if not verify_signature(secret, public_url, raw, signature):
        log.warning("callback.bad_signature", provider="simulator")
        raise PermissionDeniedException("Invalid signature")
    try:
        payload = msgspec.json.decode(raw, type=dict[str, object])
        status = SIMULATOR_STATUSES[str(payload["status"])]
    except (msgspec.DecodeError, KeyError):
        raise ClientException("missing or invalid parameter status") from None
    sid = message_sid
    structlog.contextvars.bind_contextvars(messageSid=sid)
    report = StatusReport(
        status,
        source="callback",
        provider="simulator",
        provider_status=str(payload["status"]),
        provider_message_id=str(payload.get("id") or "") or None,
        error_code=str(payload["errorCode"]) if payload.get("errorCode") else None,
        payload=payload,
    )

    def apply() -> None:
        with placement.db.transaction() as session:
            matched = sid or find_sid(session, "simulator", report.provider_message_id)
            apply_status(session, matched, report, utcnow())

    await anyio.to_thread.run_sync(apply)
    return
