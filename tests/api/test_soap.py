"""Send SMS over SOAP: every row of the seed's SOAP "Expected Responses" table, envelope for
envelope, the seed's sample request shape, the WSDL, and a parser that cannot be abused.

A success means the message is committed in PostgreSQL and its send task is on Redis; every
refusal, and every envelope the service will not read, leaves neither behind."""

from __future__ import annotations

import re
from datetime import timedelta
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape

import httpx
import pytest
from defusedxml.ElementTree import fromstring
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import delete, select, update

from shared.accounts import provisioning
from shared.core.db import Database
from shared.core.models import (
    DeflectedCall,
    InteractionToken,
    MessageStatus,
    ProviderAccount,
    utcnow,
)
from shared.core.settings import Settings
from tests.support.api import (
    CAMPAIGN_LINK,
    assert_nothing_placed,
    issue_token,
    other_account_token,
    put_campaign,
    queued_sends,
    queued_tasks,
    stored_messages,
)
from tests.support.data import (
    CALLER,
    CALLER_E164,
    KEY,
    OTHER_KEY,
    OTHER_TENANT,
    SENDER,
    TENANT,
    Demo,
    headers,
)

SOAP = "/interact/version/2/agent/soap"
WSDL = f"{SOAP}/agent.wsdl"
ENVELOPE_NS = "http://schemas.xmlsoap.org/soap/envelope/"
AGENT_NS = "http://com/jacada/interact/agent/soap"
WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
WSDL_SOAP_NS = "http://schemas.xmlsoap.org/wsdl/soap/"
XSD_NS = "http://www.w3.org/2001/XMLSchema"
SEND_TASK = "sms.send"
SYSTEM_SENDERS = ["+12025550199", "+12025550100"]

# The seed's "Expected Responses" table for SOAP, copied verbatim; only the placeholders
# (<campaign id>, <parameter>, and the example messageSid) are format fields.
SUCCESS_ENVELOPE = (
    '<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://schemas.xmlsoap.org/soap/envelope/"> '
    "<SOAP-ENV:Header/> <SOAP-ENV:Body> "
    '<ns2:CampaignSMSResponse xmlns:ns2="http://com/jacada/interact/agent/soap"> '
    "<ns2:message>message: Campaign {campaign_id} was sent to queue messageSid: {sid}"
    "</ns2:message> </ns2:CampaignSMSResponse> </SOAP-ENV:Body> </SOAP-ENV:Envelope>"
)
INVALID_PARAMETER_ENVELOPE = (
    '<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://schemas.xmlsoap.org/soap/envelope/"> '
    "<SOAP-ENV:Header/> <SOAP-ENV:Body> "
    '<ns2:GetInteractionUniqueIdResponse xmlns:ns2="http://com/jacada/interact/agent/soap"> '
    "<ns2:uniqueId>Missing or invalid parameter {parameter}</ns2:uniqueId> "
    "</ns2:GetInteractionUniqueIdResponse> </SOAP-ENV:Body> </SOAP-ENV:Envelope>"
)
UNAUTHORIZED_ENVELOPE = (
    '<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://schemas.xmlsoap.org/soap/envelope/"> '
    "<SOAP-ENV:Header/> <SOAP-ENV:Body> <SOAP-ENV:Fault> <faultcode>0x7000000</faultcode> "
    "<faultstring>Request is unauthorized, missing or wrong credentials</faultstring> "
    "</SOAP-ENV:Fault> </SOAP-ENV:Body> </SOAP-ENV:Envelope>"
)
CAMPAIGN_NOT_FOUND_ENVELOPE = (
    '<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://schemas.xmlsoap.org/soap/envelope/"> '
    "<SOAP-ENV:Header/> <SOAP-ENV:Body> "
    '<ns2:GetInteractionUniqueIdResponse xmlns:ns2="http://com/jacada/interact/agent/soap"> '
    "<ns2:uniqueId>Campaign {campaign_id} was not found</ns2:uniqueId> "
    "</ns2:GetInteractionUniqueIdResponse> </SOAP-ENV:Body> </SOAP-ENV:Envelope>"
)
# The "expired" and "not configured" rows are the same envelope.
PROVIDER_NOT_DEFINED_ENVELOPE = (
    '<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://schemas.xmlsoap.org/soap/envelope/"> '
    "<SOAP-ENV:Header/> <SOAP-ENV:Body> "
    '<ns2:GetInteractionUniqueIdResponse xmlns:ns2="http://com/jacada/interact/agent/soap"> '
    "<ns2:uniqueId>Your Telephony provider is not defined, please contact Uniphore Support "
    "and read the following +link+</ns2:uniqueId> "
    "</ns2:GetInteractionUniqueIdResponse> </SOAP-ENV:Body> </SOAP-ENV:Envelope>"
)

# The seed's "Sample Request", verbatim (its campaign "camp 1" and jpToken do not exist here).
SEED_SAMPLE_REQUEST = (
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
    'xmlns:soap="http://com/jacada/interact/agent/soap"> <soapenv:Header/> <soapenv:Body> '
    "<soap:CampaignSMSRequest> <soap:campaignId>camp 1</soap:campaignId> <!--Optional:--> "
    "<soap:additionalParams>Variable1=Value1</soap:additionalParams> "
    "<soap:callerId>+972548120901</soap:callerId> <!--Optional:--> <soap:from></soap:from> "
    "<!--Optional:--> <soap:sendFromMasterAccount>false</soap:sendFromMasterAccount> "
    "<!--Optional:--> <soap:jpToken>Aejhib7</soap:jpToken> </soap:CampaignSMSRequest> "
    "</soapenv:Body> </soapenv:Envelope>"
)

SENT = re.compile(r"<ns2:message>message: Campaign .* was sent to queue messageSid: (SM[0-9a-f]+)<")


def soap_request(
    campaign_id: str | None = "campaign1",
    caller_id: str | None = CALLER,
    *,
    additional_params: str | None = "Variable1=Value1",
    sender: str | None = "",
    send_from_master_account: str | None = "false",
    jp_token: str | None = None,
) -> str:
    """A CampaignSMSRequest in the shape of the seed's sample; None leaves an element out."""
    optional = "<!--Optional:--> "

    def element(name: str, value: str | None, prefix: str = "") -> str:
        if value is None:
            return ""
        return f"{prefix}<soap:{name}>{escape(value)}</soap:{name}> "

    return (
        f'<soapenv:Envelope xmlns:soapenv="{ENVELOPE_NS}" xmlns:soap="{AGENT_NS}"> '
        "<soapenv:Header/> <soapenv:Body> <soap:CampaignSMSRequest> "
        + element("campaignId", campaign_id)
        + element("additionalParams", additional_params, optional)
        + element("callerId", caller_id)
        + element("from", sender, optional)
        + element("sendFromMasterAccount", send_from_master_account, optional)
        + element("jpToken", jp_token, optional)
        + "</soap:CampaignSMSRequest> </soapenv:Body> </soapenv:Envelope>"
    )


def post_soap(
    client: TestClient[Litestar],
    envelope: str | bytes,
    request_headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST an envelope to the SOAP endpoint as a SOAP 1.1 client does."""
    sent_headers = headers() if request_headers is None else request_headers
    return client.post(
        SOAP,
        headers={**sent_headers, "Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'},
        content=envelope.encode() if isinstance(envelope, str) else envelope,
    )


def sent_sid(response: httpx.Response) -> str:
    match = SENT.search(response.text)
    assert match is not None, response.text
    return match.group(1)


def assert_envelope(response: httpx.Response, status: int, expected: str) -> None:
    """Exactly this HTTP status and this envelope text, as XML."""
    assert (response.status_code, response.text) == (status, expected)
    assert response.headers["content-type"] == "text/xml; charset=utf-8"


def fault_of(response: httpx.Response) -> tuple[str, str]:
    """(faultcode, faultstring) of a SOAP 1.1 Fault answer."""
    root = fromstring(response.content)
    assert root.tag == f"{{{ENVELOPE_NS}}}Envelope", response.text
    body = root.find(f"{{{ENVELOPE_NS}}}Body")
    assert body is not None, response.text
    children = list(body)
    assert [child.tag for child in children] == [f"{{{ENVELOPE_NS}}}Fault"], response.text
    return (children[0].findtext("faultcode") or "", children[0].findtext("faultstring") or "")


def assert_no_stack_trace(response: httpx.Response) -> None:
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    assert ".py" not in response.text


def expire_own_provider_settings(db: Database, account_id: int) -> None:
    with db.transaction() as session:
        session.execute(
            update(ProviderAccount)
            .where(ProviderAccount.account_id == account_id)
            .values(expires_at=utcnow() - timedelta(minutes=1))
        )


def delete_own_provider_settings(db: Database, account_id: int) -> None:
    with db.transaction() as session:
        session.execute(delete(ProviderAccount).where(ProviderAccount.account_id == account_id))


def create_system_account(db: Database) -> int:
    """The `system` (master) account with its own provider settings; their id."""
    with db.transaction() as session:
        system = provisioning.create_account(session, "system", "System")
        settings = provisioning.set_provider(
            session, system, "simulator", sender_ids=SYSTEM_SENDERS
        )
        return settings.id


# Success: "message: Campaign <campaign id> was sent to queue messageSid: SM..."


def test_success_answers_the_seeds_campaign_sms_response_envelope(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = post_soap(client, soap_request())

    sid = sent_sid(response)
    assert re.fullmatch(r"SM[0-9a-f]{32}", sid), sid
    assert_envelope(response, 200, SUCCESS_ENVELOPE.format(campaign_id="campaign1", sid=sid))


def test_success_records_the_message_queued_for_the_caller_in_e164(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = post_soap(client, soap_request())

    [message] = stored_messages(db)
    assert message.sid == sent_sid(response)
    assert message.account_id == demo.account_id
    assert message.campaign_id == "campaign1"
    assert message.status == MessageStatus.QUEUED.value
    assert message.to_number == CALLER_E164
    assert message.provider == "simulator"


def test_success_puts_exactly_one_send_task_on_the_redis_queue(
    client: TestClient[Litestar], demo: Demo, redis_url: str
) -> None:
    response = post_soap(client, soap_request())

    assert queued_sends(redis_url) == [(SEND_TASK, [sent_sid(response)])]


def test_success_sends_from_the_accounts_first_sender_when_from_is_empty(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    post_soap(client, soap_request(sender=""))

    [message] = stored_messages(db)
    assert message.from_number == SENDER


def test_from_may_name_another_sender_of_the_account(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = post_soap(client, soap_request(sender="ACME"))

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.from_number == "ACME"


def test_additional_params_are_added_to_the_campaign_link(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    post_soap(client, soap_request(additional_params="Variable1=Value1"))

    [message] = stored_messages(db)
    assert message.body == f"Please click here {CAMPAIGN_LINK}&Variable1=Value1"


def test_only_the_required_elements_are_enough(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    envelope = soap_request(additional_params=None, sender=None, send_from_master_account=None)

    response = post_soap(client, envelope)

    assert_envelope(
        response, 200, SUCCESS_ENVELOPE.format(campaign_id="campaign1", sid=sent_sid(response))
    )
    assert len(stored_messages(db)) == 1


def test_the_environment_name_header_selects_the_campaigns_environment(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    put_campaign(db, "dev-only", environment="DEV")

    response = post_soap(client, soap_request("dev-only"), headers(**{"Environment-Name": "DEV"}))

    assert_envelope(
        response, 200, SUCCESS_ENVELOPE.format(campaign_id="dev-only", sid=sent_sid(response))
    )
    [message] = stored_messages(db)
    assert message.campaign_id == "dev-only"


# jpToken: optional over SOAP (the WSDL's minOccurs="0"), but checked when given


def test_jp_token_is_optional_and_without_it_the_message_has_no_token(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = post_soap(client, soap_request(jp_token=None))

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.token_id is None
    assert "startedFromSmsToken" not in message.body


def test_a_valid_jp_token_links_the_message_to_the_call(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    response = post_soap(client, soap_request(jp_token=token))

    assert_envelope(
        response, 200, SUCCESS_ENVELOPE.format(campaign_id="campaign1", sid=sent_sid(response))
    )
    with db.transaction() as session:
        token_id = session.scalar(
            select(InteractionToken.id).where(InteractionToken.token == token)
        )
        call_token_ids = list(session.scalars(select(DeflectedCall.token_id)))
    [message] = stored_messages(db)
    assert token_id is not None
    assert message.token_id == token_id
    assert call_token_ids == [token_id]  # the call whose row the send will mark smsSent
    assert f"startedFromSmsToken={token}" in message.body


def test_unknown_jp_token_answers_missing_or_invalid_parameter_jp_token(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = post_soap(client, soap_request(jp_token="Aejhib7"))

    assert_envelope(response, 200, INVALID_PARAMETER_ENVELOPE.format(parameter="jpToken"))
    assert_nothing_placed(db, redis_url)


def test_jp_token_of_another_account_answers_missing_or_invalid_parameter_jp_token(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = other_account_token(client)

    response = post_soap(client, soap_request(jp_token=token))

    assert_envelope(response, 200, INVALID_PARAMETER_ENVELOPE.format(parameter="jpToken"))
    assert_nothing_placed(db, redis_url)


# Invalid body parameter(s): "Missing or invalid parameter <parameter>"


@pytest.mark.parametrize(
    ("envelope", "parameter"),
    [
        pytest.param(soap_request(caller_id=None), "callerId", id="callerId-absent"),
        pytest.param(soap_request(caller_id=""), "callerId", id="callerId-empty"),
        pytest.param(soap_request(caller_id="not a phone"), "callerId", id="callerId-garbage"),
        pytest.param(soap_request(campaign_id=None), "campaignId", id="campaignId-absent"),
        pytest.param(soap_request(campaign_id=""), "campaignId", id="campaignId-empty"),
        pytest.param(
            soap_request(send_from_master_account="maybe"),
            "sendFromMasterAccount",
            id="sendFromMasterAccount-not-boolean",
        ),
        pytest.param(
            soap_request(additional_params="=nameless"),
            "additionalParams",
            id="additionalParams-not-a-query-string",
        ),
        pytest.param(soap_request(sender="+15555550123"), "from", id="from-not-owned"),
    ],
)
def test_invalid_body_parameter_answers_missing_or_invalid_parameter(
    client: TestClient[Litestar],
    demo: Demo,
    db: Database,
    redis_url: str,
    envelope: str,
    parameter: str,
) -> None:
    response = post_soap(client, envelope)

    assert_envelope(response, 200, INVALID_PARAMETER_ENVELOPE.format(parameter=parameter))
    assert_nothing_placed(db, redis_url)


def test_unknown_environment_name_answers_missing_or_invalid_parameter_environment_name(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = post_soap(client, soap_request(), headers(**{"Environment-Name": "NOPE"}))

    assert_envelope(response, 200, INVALID_PARAMETER_ENVELOPE.format(parameter="Environment-Name"))
    assert_nothing_placed(db, redis_url)


# Invalid security headers: the Fault 0x7000000


@pytest.mark.parametrize(
    "request_headers",
    [
        pytest.param({}, id="no-headers"),
        pytest.param({"Tenant-Id": TENANT}, id="no-application-key"),
        pytest.param({"Application-Key": KEY}, id="no-tenant-id"),
        pytest.param(headers(key="ffffffffffffffffffffffff"), id="wrong-key"),
        pytest.param(headers(tenant="99999999"), id="unknown-tenant"),
        pytest.param(headers(key=OTHER_KEY), id="another-accounts-key"),
    ],
)
def test_invalid_security_headers_answer_the_unauthorized_fault(
    client: TestClient[Litestar],
    demo: Demo,
    db: Database,
    redis_url: str,
    request_headers: dict[str, str],
) -> None:
    response = post_soap(client, soap_request(), request_headers)

    assert_envelope(response, 500, UNAUTHORIZED_ENVELOPE)
    assert_nothing_placed(db, redis_url)


def test_credentials_are_checked_before_the_body_parameters(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = post_soap(
        client, soap_request(caller_id=None), headers(OTHER_TENANT, "ffffffffffffffffffffffff")
    )

    assert_envelope(response, 500, UNAUTHORIZED_ENVELOPE)
    assert_nothing_placed(db, redis_url)


# Campaign does not exist: "Campaign <campaign id> was not found"


def test_the_seeds_sample_request_for_an_unknown_campaign_answers_not_found(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = post_soap(client, SEED_SAMPLE_REQUEST)

    assert_envelope(response, 200, CAMPAIGN_NOT_FOUND_ENVELOPE.format(campaign_id="camp 1"))
    assert_nothing_placed(db, redis_url)


def test_campaign_of_another_account_answers_not_found(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = post_soap(client, soap_request("other-campaign"))

    assert_envelope(response, 200, CAMPAIGN_NOT_FOUND_ENVELOPE.format(campaign_id="other-campaign"))
    assert_nothing_placed(db, redis_url)


def test_campaign_only_in_another_environment_answers_not_found(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, "dev-only", environment="DEV")

    response = post_soap(client, soap_request("dev-only"))

    assert_envelope(response, 200, CAMPAIGN_NOT_FOUND_ENVELOPE.format(campaign_id="dev-only"))
    assert_nothing_placed(db, redis_url)


def test_a_campaign_id_with_xml_special_characters_is_escaped_in_the_answer(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = post_soap(client, soap_request("a&b<c>"))

    assert_envelope(
        response, 200, CAMPAIGN_NOT_FOUND_ENVELOPE.format(campaign_id="a&amp;b&lt;c&gt;")
    )
    assert fromstring(response.content).findtext(f".//{{{AGENT_NS}}}uniqueId") == (
        "Campaign a&b<c> was not found"
    )


# Telephony provider settings are expired / are not configured


def test_expired_provider_settings_answer_provider_not_defined(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    expire_own_provider_settings(db, demo.account_id)

    response = post_soap(client, soap_request())

    assert_envelope(response, 200, PROVIDER_NOT_DEFINED_ENVELOPE)
    assert_nothing_placed(db, redis_url)


def test_provider_settings_not_configured_answer_provider_not_defined(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    delete_own_provider_settings(db, demo.account_id)

    response = post_soap(client, soap_request())

    assert_envelope(response, 200, PROVIDER_NOT_DEFINED_ENVELOPE)
    assert_nothing_placed(db, redis_url)


# sendFromMasterAccount: the system account's provider and number


@pytest.mark.parametrize("value", ["true", "1"])
def test_send_from_master_account_sends_with_the_system_accounts_provider_and_first_sender(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str, value: str
) -> None:
    system_settings_id = create_system_account(db)

    response = post_soap(client, soap_request(send_from_master_account=value))

    assert_envelope(
        response, 200, SUCCESS_ENVELOPE.format(campaign_id="campaign1", sid=sent_sid(response))
    )
    [message] = stored_messages(db)
    assert message.provider_account_id == system_settings_id
    assert message.from_number == SYSTEM_SENDERS[0]
    assert message.account_id == demo.account_id
    assert queued_tasks(redis_url) == 1


def test_send_from_master_account_false_keeps_the_accounts_own_provider(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    create_system_account(db)

    post_soap(client, soap_request(send_from_master_account="false"))

    [message] = stored_messages(db)
    with db.transaction() as session:
        own = session.scalar(
            select(ProviderAccount.id).where(ProviderAccount.account_id == demo.account_id)
        )
    assert message.provider_account_id == own
    assert message.from_number == SENDER


def test_send_from_master_account_without_a_system_account_answers_provider_not_defined(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = post_soap(client, soap_request(send_from_master_account="true"))

    assert_envelope(response, 200, PROVIDER_NOT_DEFINED_ENVELOPE)
    assert_nothing_placed(db, redis_url)


# General error: a Fault whose faultstring is "exception"


def test_unexpected_error_answers_a_fault_exception_and_records_nothing(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, link_url="http://[::1")  # urlsplit raises ValueError on it

    response = post_soap(client, soap_request())

    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/xml")
    assert fault_of(response) == ("SOAP-ENV:Server", "exception")
    assert_no_stack_trace(response)
    assert_nothing_placed(db, redis_url)


# The WSDL


def test_wsdl_is_served_as_xml(client: TestClient[Litestar]) -> None:
    response = client.get(WSDL)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert fromstring(response.content).tag == f"{{{WSDL_NS}}}definitions"


def test_wsdl_soap_address_is_the_public_base_url_of_the_soap_endpoint(
    client: TestClient[Litestar], migrated: Settings
) -> None:
    root = fromstring(client.get(WSDL).content)

    addresses = [a.get("location") for a in root.iter(f"{{{WSDL_SOAP_NS}}}address")]
    assert addresses == [migrated.public_base_url + SOAP]


def test_wsdl_declares_the_seeds_input_parameters_in_order(client: TestClient[Litestar]) -> None:
    root = fromstring(client.get(WSDL).content)

    request = _schema_element(root, "CampaignSMSRequest")
    sequence = f"{{{XSD_NS}}}complexType/{{{XSD_NS}}}sequence/{{{XSD_NS}}}element"
    fields = [(e.get("name"), e.get("minOccurs", "1")) for e in request.findall(sequence)]
    assert fields == [
        ("campaignId", "1"),
        ("additionalParams", "0"),
        ("callerId", "1"),
        ("from", "0"),
        ("sendFromMasterAccount", "0"),
        ("jpToken", "0"),
    ]


def _schema_element(root: Element, name: str) -> Element:
    schema = root.find(f"{{{WSDL_NS}}}types/{{{XSD_NS}}}schema")
    assert schema is not None
    assert schema.get("targetNamespace") == AGENT_NS
    for element in schema.findall(f"{{{XSD_NS}}}element"):
        if element.get("name") == name:
            return element
    raise AssertionError(f"no {name} in the WSDL's schema")


# Hardened XML: every envelope the service will not read is a Client Fault, nothing more

BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n<!ENTITY lol "lol">\n'
    + "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">\n'
        for i in range(1, 10)
    )
    + "]>\n"
    + soap_request(caller_id=None).replace(
        "</soap:CampaignSMSRequest>",
        "<soap:callerId>&lol9;</soap:callerId> </soap:CampaignSMSRequest>",
    )
)
XXE = (
    '<?xml version="1.0"?>\n'
    '<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    + soap_request(caller_id=None, additional_params=None).replace(
        "</soap:CampaignSMSRequest>",
        "<soap:callerId>&xxe;</soap:callerId> </soap:CampaignSMSRequest>",
    )
)
WRONG_OPERATION_NAMESPACE = soap_request().replace(
    f'xmlns:soap="{AGENT_NS}"', 'xmlns:soap="http://example.com/not/the/agent"'
)
NO_BODY = f'<soapenv:Envelope xmlns:soapenv="{ENVELOPE_NS}"> <soapenv:Header/> </soapenv:Envelope>'
SOAP_12_ENVELOPE = soap_request().replace(ENVELOPE_NS, "http://www.w3.org/2003/05/soap-envelope")
NOT_AN_ENVELOPE = f'<soap:CampaignSMSRequest xmlns:soap="{AGENT_NS}"/>'
TEN_MEGABYTES = soap_request(additional_params="v=" + "x" * (10 * 1024 * 1024))


@pytest.mark.parametrize(
    ("envelope", "status"),
    [
        pytest.param(BILLION_LAUGHS, 500, id="billion-laughs"),
        pytest.param(XXE, 500, id="external-entity"),
        pytest.param(WRONG_OPERATION_NAMESPACE, 500, id="operation-in-the-wrong-namespace"),
        pytest.param(NO_BODY, 500, id="no-body"),
        pytest.param(SOAP_12_ENVELOPE, 500, id="soap-1.2-envelope"),
        pytest.param(NOT_AN_ENVELOPE, 500, id="not-an-envelope"),
        pytest.param("callerId=+972544696388&campaignId=campaign1", 500, id="not-xml"),
        pytest.param("", 500, id="empty"),
        pytest.param(
            '<?xml version="1.0" encoding="bogus"?>' + soap_request(),
            500,
            id="unknown-encoding-declared",
        ),
        pytest.param(
            '<?xml version="1.0" encoding="Shift_JIS"?>' + soap_request(),
            500,
            id="multi-byte-encoding-declared",
        ),
        pytest.param(TEN_MEGABYTES, 413, id="ten-megabytes"),
    ],
)
def test_an_envelope_the_service_will_not_read_gets_a_client_fault_and_places_nothing(
    client: TestClient[Litestar],
    demo: Demo,
    db: Database,
    redis_url: str,
    envelope: str,
    status: int,
) -> None:
    response = post_soap(client, envelope)

    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/xml")
    code, _text = fault_of(response)
    assert code == "SOAP-ENV:Client"
    assert_no_stack_trace(response)
    assert_nothing_placed(db, redis_url)


def test_an_external_entity_is_never_resolved_into_the_answer(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = post_soap(client, XXE)

    assert "root:" not in response.text
    assert "/etc/passwd" not in response.text


def test_the_billion_laughs_entities_are_never_expanded_into_the_answer(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = post_soap(client, BILLION_LAUGHS)

    assert "lollol" not in response.text
    assert len(response.content) < 4096
