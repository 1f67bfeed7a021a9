"""Provider status callbacks: verified, stored raw, then applied through the one lifecycle."""

from __future__ import annotations

import anyio.to_thread
import msgspec
import structlog
from litestar import MediaType, Request, post
from litestar.datastructures import State
from litestar.exceptions import ClientException, PermissionDeniedException
from litestar.openapi.datastructures import ResponseSpec

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
    responses={403: ResponseSpec(str, description="Invalid signature", media_type=MediaType.TEXT)},
)
async def simulator_callback(request: Request[object, object, State]) -> None:
    placement: Placement = request.app.state.placement
    raw = await request.body()
    # Signed over the public URL the provider called, so it also verifies behind a proxy.
    public_url = placement.settings.public_base_url.rstrip("/") + request.url.path
    if request.url.query:
        public_url += "?" + request.url.query
    secret = placement.settings.simulator_signing_secret.get_secret_value()
    if not verify_signature(secret, public_url, raw, request.headers.get(SIGNATURE_HEADER)):
        log.warning("callback.bad_signature", provider="simulator")
        raise PermissionDeniedException("Invalid signature")
    try:
        payload = msgspec.json.decode(raw, type=dict[str, object])
        status = SIMULATOR_STATUSES[str(payload["status"])]
    except (msgspec.DecodeError, KeyError):
        raise ClientException("missing or invalid parameter status") from None
    sid = request.query_params.get("messageSid")
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
