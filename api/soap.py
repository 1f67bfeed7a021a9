"""SOAP Send SMS (`CampaignSMSRequest`), answered exactly as the seed's SOAP table shows.

Parsing is hardened: no DTDs, no entities, no external fetches, and a size limit before any
parsing starts. The request goes through the same accept service as REST: no logic twice."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import escape

import structlog
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import HeaderParameter

from api.dependencies import AcceptDep, SettingsDep
from api.errors import SERVICE_UNAVAILABLE, database_unavailable, note_refusal
from api.guard import note_auth_failure
from api.headers import ApplicationKey, EnvironmentName, TenantId
from api.openapi import SID_EXAMPLE, TOO_MANY_FAILURES, documented, text, xml
from shared.core.errors import (
    UNAUTHORIZED_CODE,
    UNAUTHORIZED_MESSAGE,
    InvalidParameter,
    RequestRefused,
    Unauthenticated,
)
from shared.messages.accept import SendSmsCommand

log = structlog.get_logger(__name__)

SOAP_PATH = "/interact/version/2/agent/soap"
WSDL_PATH = f"{SOAP_PATH}/agent.wsdl"
ENVELOPE_NS = "http://schemas.xmlsoap.org/soap/envelope/"
AGENT_NS = "http://com/jacada/interact/agent/soap"
MAX_ENVELOPE_BYTES = 64 * 1024  # a CampaignSMSRequest is a few hundred bytes
XML = "text/xml"  # Litestar adds "; charset=utf-8" itself
WSDL_TEMPLATE = (Path(__file__).parent / "agent.wsdl").read_text()

# The seed prints its envelopes on one line with single spaces between tags; we answer the same.
_ENVELOPE = (
    f'<SOAP-ENV:Envelope xmlns:SOAP-ENV="{ENVELOPE_NS}"> <SOAP-ENV:Header/> '
    "<SOAP-ENV:Body> {body} </SOAP-ENV:Body> </SOAP-ENV:Envelope>"
)
_RESPONSE = (
    f'<ns2:{{element}} xmlns:ns2="{AGENT_NS}"> <ns2:{{field}}>{{text}}</ns2:{{field}}> '
    "</ns2:{element}>"
)
_FAULT = (
    "<SOAP-ENV:Fault> <faultcode>{code}</faultcode> <faultstring>{text}</faultstring> "
    "</SOAP-ENV:Fault>"
)


def envelope(body: str) -> str:
    return _ENVELOPE.format(body=body)


def campaign_sms_response(message: str) -> str:
    return envelope(
        _RESPONSE.format(element="CampaignSMSResponse", field="message", text=escape(message))
    )


def unique_id_response(text: str) -> str:
    # The Interact service reports errors in GetInteractionUniqueIdResponse; callers parse it.
    return envelope(
        _RESPONSE.format(
            element="GetInteractionUniqueIdResponse", field="uniqueId", text=escape(text)
        )
    )


def fault(code: str, text: str) -> str:
    return envelope(_FAULT.format(code=escape(code), text=escape(text)))


class MalformedEnvelope(Exception):
    """Not a SOAP 1.1 CampaignSMSRequest we will read."""


def parse_request(raw: bytes) -> dict[str, str]:
    """The CampaignSMSRequest fields by local name; MalformedEnvelope for anything else."""
    try:
        root = fromstring(raw, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    # LookupError and ValueError: an unknown or multi-byte encoding in the XML declaration.
    except (ParseError, DefusedXmlException, LookupError, ValueError) as exc:
        raise MalformedEnvelope(f"Malformed or forbidden XML: {type(exc).__name__}") from None
    if root.tag != f"{{{ENVELOPE_NS}}}Envelope":
        raise MalformedEnvelope("Not a SOAP 1.1 Envelope")
    body = root.find(f"{{{ENVELOPE_NS}}}Body")
    if body is None:
        raise MalformedEnvelope("Missing SOAP Body")
    operation = next(iter(body), None)
    if operation is None or operation.tag != f"{{{AGENT_NS}}}CampaignSMSRequest":
        found = operation.tag if operation is not None else "nothing"
        raise MalformedEnvelope(f"Expected {{{AGENT_NS}}}CampaignSMSRequest, found {found}")
    return {_local(child): (child.text or "").strip() for child in operation if _ours(child)}


def _local(element: Element) -> str:
    return element.tag.rpartition("}")[2]


def _ours(element: Element) -> bool:
    return isinstance(element.tag, str) and element.tag.startswith(f"{{{AGENT_NS}}}")


def command_from(
    fields: dict[str, str],
    tenant_id: str | None,
    application_key: str | None,
    environment_name: str | None,
) -> SendSmsCommand:
    """The SOAP request as the accept service's command (jpToken optional, as the WSDL says)."""
    master = fields.get("sendFromMasterAccount", "").lower()
    invalid = None
    if master not in ("", "true", "false", "1", "0"):
        invalid = "sendFromMasterAccount"
    if not fields.get("campaignId"):
        invalid = invalid or "campaignId"
    return SendSmsCommand(
        # SOAP names no account in its URL: the Tenant-Id header is the account.
        account_in_url=tenant_id or "",
        tenant_id=tenant_id,
        application_key=application_key,
        environment_name=environment_name,
        campaign_id=fields.get("campaignId", ""),
        caller_id=fields.get("callerId") or None,
        sender=fields.get("from") or None,
        jp_token=fields.get("jpToken") or None,
        additional_params=fields.get("additionalParams") or None,
        invalid_parameter=invalid,
        require_token=False,
        from_system_account=master in ("true", "1"),
    )


def _xml(text: str, status: int = 200) -> Response[str]:
    return Response(text, status_code=status, media_type=XML)


def refused_envelope(exc: RequestRefused) -> Response[str]:
    """The seed's SOAP answer for a refusal: a Fault for credentials, uniqueId for the rest."""
    if isinstance(exc, Unauthenticated):
        return _xml(fault(UNAUTHORIZED_CODE, exc.text), 500)
    if isinstance(exc, InvalidParameter):
        return _xml(unique_id_response(f"Missing or invalid parameter {exc.parameter}"))
    return _xml(unique_id_response(exc.text))


SOAP_FAULTS = {
    400: text(
        "A header with control characters, refused before the SOAP handling",
        "missing or invalid parameter Environment-Name",
    ),
    413: xml(
        "An envelope over the SOAP limit: a Client fault",
        fault("SOAP-ENV:Client", "Request too large"),
    ),
    429: xml(
        "Too many missing or wrong credentials from this address lately: a Client fault, "
        "with Retry-After",
        fault(
            "SOAP-ENV:Client",
            "Too many requests with missing or wrong credentials from this address; "
            "retry after 300 seconds",
        ),
    ),
    500: xml(
        "A SOAP fault, as SOAP 1.1 answers them: missing or wrong credentials (0x7000000), a "
        "malformed envelope (SOAP-ENV:Client), the database unreachable or not answering in "
        "time (SOAP-ENV:Server `service unavailable`: retry later) or anything unexpected "
        "(SOAP-ENV:Server `exception`)",
        fault(UNAUTHORIZED_CODE, UNAUTHORIZED_MESSAGE),
    ),
}


@get(
    WSDL_PATH,
    media_type=XML,
    tags=["SOAP"],
    summary="SOAP WSDL (Send SMS)",
    operation_class=documented(errors={429: TOO_MANY_FAILURES}),
)
async def agent_wsdl(settings: SettingsDep) -> str:
    address = settings.public_base_url.rstrip("/") + SOAP_PATH
    return WSDL_TEMPLATE.replace("{address}", escape(address, {'"': "&quot;"}))


@post(
    SOAP_PATH,
    tags=["SOAP"],
    summary="SOAP Send SMS (CampaignSMSRequest)",
    description="SOAP 1.1 document/literal; see the WSDL. Same headers as REST.",
    status_code=200,
    operation_class=documented(
        errors=SOAP_FAULTS,
        success=xml(
            "CampaignSMSResponse: queued, or the seed's uniqueId answer for a refusal",
            "<SOAP-ENV:Envelope>…<ns2:message>message: Campaign campaign1 was sent to queue "
            f"messageSid: {SID_EXAMPLE}</ns2:message>…</SOAP-ENV:Envelope>",
        ),
    ),
    request_max_body_size=None,  # enforced below, so that too large is a SOAP fault too
)
async def soap_endpoint(
    request: Request[object, object, State],
    accept: AcceptDep,
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
    soap_action: Annotated[str | None, HeaderParameter(name="SOAPAction")] = None,
) -> Response[str]:
    if not tenant_id or not application_key:
        # No credentials at all: answered before the body is read, let alone parsed.
        note_auth_failure(request.scope)
        return _xml(fault(UNAUTHORIZED_CODE, UNAUTHORIZED_MESSAGE), 500)
    raw = bytearray()
    async for chunk in request.stream():
        raw.extend(chunk)
        if len(raw) > MAX_ENVELOPE_BYTES:
            log.warning("soap.too_large", limit=MAX_ENVELOPE_BYTES)
            return _xml(fault("SOAP-ENV:Client", "Request too large"), 413)
    try:
        fields = parse_request(bytes(raw))
    except MalformedEnvelope as exc:
        log.info("soap.malformed", reason=str(exc), soap_action=soap_action)
        return _xml(fault("SOAP-ENV:Client", str(exc)), 500)
    command = command_from(fields, tenant_id, application_key, environment_name)
    try:
        accepted = await accept.send(command)
    except RequestRefused as exc:
        note_refusal(request, exc)
        return refused_envelope(exc)
    except Exception as exc:
        if database_unavailable(exc):
            # Down, saturated or past SMSD_API_ACCEPT_DEADLINE: a Server fault (SOAP 1.1 answers
            # faults with 500) that says so; nothing was accepted, retry later.
            log.warning("request.database_unavailable", error=type(exc).__name__)
            return _xml(fault("SOAP-ENV:Server", SERVICE_UNAVAILABLE.decode()), 500)
        log.exception("request.failed")
        return _xml(fault("SOAP-ENV:Server", "exception"), 500)
    return _xml(
        campaign_sms_response(
            f"message: Campaign {accepted.campaign_id} was sent to queue messageSid: {accepted.sid}"
        )
    )
