"""The accept path shared by every edge (REST v3 now, SOAP and v2 later): validate, render, record.

Nothing here publishes to the queue: the caller commits first and publishes after, so a
message is never on the queue without being in the database."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.accounts.access import (
    authenticate,
    cached_campaign,
    resolve_environment,
    resolve_provider_account,
)
from shared.calls.links import interaction_link, shorten
from shared.calls.tokens import TokenRef, find_token
from shared.core.errors import CampaignNotFound, IdempotencyConflict, InvalidParameter, TokenExpired
from shared.core.models import Account, Campaign, MessageStatus
from shared.core.settings import Settings
from shared.messages import queries
from shared.text.phone import normalise_sender, to_e164
from shared.text.rendering import build_link, parse_additional_params, render_text
from shared.text.segments import measure

log = structlog.get_logger(__name__)


def new_message_sid() -> str:
    """`SM` + 32 lowercase hex digits, the shape of the seed's example (and of a Twilio SID)."""
    return "SM" + uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class SendSmsCommand:
    """A send request as any edge understood it, before anything is checked."""

    account_in_url: str
    tenant_id: str | None
    application_key: str | None
    environment_name: str | None
    campaign_id: str
    caller_id: str | None
    sender: str | None = None
    jp_token: str | None = None
    additional_params: str | None = None
    # Set by the edge when its body could not be read; reported only once the caller is known.
    invalid_parameter: str | None = None
    require_token: bool = True
    from_system_account: bool = False
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        """What makes two requests "the same" for an Idempotency-Key: everything but credentials."""
        fields = asdict(self)
        for secret_or_transport in ("application_key", "tenant_id", "idempotency_key"):
            fields.pop(secret_or_transport)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AcceptedMessage:
    sid: str
    campaign_id: str
    # True when an Idempotency-Key matched an earlier request: nothing new was recorded.
    replayed: bool = False


def accept_send(
    session: Session, command: SendSmsCommand, settings: Settings, now: datetime
) -> AcceptedMessage:
    """Check a send request in the seed's order of answers and add its message to the session."""
    account = authenticated_account(session, command)
    if command.idempotency_key:
        earlier = _find_replay(session, account.id, command)
        if earlier is not None:
            return earlier
    campaign = usable_campaign(session, account, command.environment_name, command.campaign_id, now)
    to_number = _caller(command.caller_id, settings)
    token = _token(session, campaign, command.jp_token, now, required=command.require_token)
    params = additional_params(command.additional_params)

    provider_account = resolve_provider_account(
        session, account, now, from_system=command.from_system_account
    )
    sender = _sender(command.sender, provider_account.sender_ids, settings)
    link = (
        build_link(campaign.link_url, params, token.token if token else None)
        if campaign.link_url
        else None
    )
    message: dict[str, Any] = dict(
        sid=new_message_sid(),
        account_id=account.id,
        environment_id=campaign.environment_id,
        campaign_pk=campaign.id,
        campaign_id=campaign.campaign_id,
        token_id=token.id if token else None,
        to_number=to_number,
        from_number=sender,
        body="",  # rendered below, once its short link (if any) exists
        status=MessageStatus.QUEUED.value,
        provider=provider_account.provider,
        provider_account_id=provider_account.id,
        idempotency_key=command.idempotency_key,
        request_fingerprint=command.fingerprint() if command.idempotency_key else None,
        created_at=now,
        updated_at=now,
        expires_at=now + settings.message_validity,
    )

    def record() -> None:
        shown = link
        if shown and campaign.shorten_links:
            shown = shorten(session, account.id, shown, token.id if token else None, settings, now)
        message["body"] = render_text(campaign.message_text, shown)
        size = measure(message["body"])
        if size.segments > campaign.max_segments:
            # Blame the caller's parameters only if the text fits without them; otherwise the
            # campaign is over its own limit. Nothing is added, and the caller's transaction
            # (with any short link) rolls back.
            log.info(
                "message.too_long",
                segments=size.segments,
                max_segments=campaign.max_segments,
                encoding=size.encoding,
                units=size.units,
            )
            raise InvalidParameter(
                "additionalParams"
                if _params_made_it_long(campaign, token, params)
                else "campaignId"
            )
        message["segments"] = size.segments
        message["encoding"] = size.encoding
        queries.insert_message(session, message)

    if command.idempotency_key:
        # A concurrent twin with the same key may win the insert: answer with its message,
        # and keep nothing of ours (its short link included).
        try:
            with session.begin_nested():
                record()
        except IntegrityError:
            replay = _find_replay(session, account.id, command)
            if replay is None:
                raise
            return replay
    else:
        record()
    structlog.contextvars.bind_contextvars(messageSid=message["sid"])
    log.info("message.accepted", to=to_number, provider=provider_account.provider)
    return AcceptedMessage(sid=message["sid"], campaign_id=campaign.campaign_id)


def notify_external_send(
    session: Session, command: SendSmsCommand, settings: Settings, now: datetime
) -> str:
    """Notify SMS: the caller's own gateway sent the campaign; record `smsSent` for the call.

    Same checks and answers as a send, but nothing is queued and no provider is needed.
    Returns the jpToken whose call was marked."""
    account = authenticated_account(session, command)
    campaign = usable_campaign(session, account, command.environment_name, command.campaign_id, now)
    _caller(command.caller_id, settings)
    token = _token(session, campaign, command.jp_token, now, required=True)
    assert token is not None  # required=True never returns None
    queries.mark_call_sent_externally(session, token.id, campaign.campaign_id, now)
    log.info("call.notified", jpToken=token.token)
    return token.token


def get_interaction_link(
    session: Session, command: SendSmsCommand, shorten_it: bool, settings: Settings, now: datetime
) -> str:
    """Get Interaction Link: the campaign's link with `additionalParams`, maybe shortened."""
    account = authenticated_account(session, command)
    campaign = usable_campaign(session, account, command.environment_name, command.campaign_id, now)
    params = additional_params(command.additional_params)
    return interaction_link(
        session, account.id, campaign.link_url, params, shorten_it, settings, now
    )


def _params_made_it_long(
    campaign: Campaign, token: TokenRef | None, params: list[tuple[str, str]]
) -> bool:
    if not params or not campaign.link_url or campaign.shorten_links:
        return False  # the parameters are absent, or do not reach the text
    bare = build_link(campaign.link_url, [], token.token if token else None)
    return measure(render_text(campaign.message_text, bare)).segments <= campaign.max_segments


# The checks every request of the family makes, in the seed's order of answers.


def authenticated_account(session: Session, command: SendSmsCommand) -> Account:
    """The caller's account; a body the edge could not read is reported only after this."""
    account = authenticate(
        session, command.account_in_url, command.tenant_id, command.application_key
    )
    structlog.contextvars.bind_contextvars(account=account.tenant_id, campaign=command.campaign_id)
    if command.invalid_parameter:
        raise InvalidParameter(command.invalid_parameter)
    return account


def usable_campaign(
    session: Session,
    account: Account,
    environment_name: str | None,
    campaign_id: str,
    now: datetime,
) -> Campaign:
    """The campaign, if it exists in the environment (404) and is active and current (403)."""
    environment = resolve_environment(session, account, environment_name)
    # A NUL byte cannot be in any stored id (PostgreSQL refuses it), so no such campaign.
    campaign = None if "\x00" in campaign_id else cached_campaign(session, environment, campaign_id)
    if campaign is None:
        raise CampaignNotFound(campaign_id)
    if not campaign.active:
        raise TokenExpired("campaign inactive")
    if (campaign.valid_from and campaign.valid_from > now) or (
        campaign.valid_until and campaign.valid_until <= now
    ):
        raise TokenExpired("campaign outside its validity")
    return campaign


def additional_params(raw: str | None) -> list[tuple[str, str]]:
    if not raw:
        return []
    parsed = parse_additional_params(raw)
    if parsed is None:
        raise InvalidParameter("additionalParams")
    return parsed


def _caller(caller_id: str | None, settings: Settings) -> str:
    to_number = to_e164(caller_id, settings.default_region) if caller_id else None
    if to_number is None:
        raise InvalidParameter("callerId")
    return to_number


def _token(
    session: Session, campaign: Campaign, jp_token: str | None, now: datetime, *, required: bool
) -> TokenRef | None:
    if not jp_token:
        if required:
            raise InvalidParameter("jpToken")
        return None
    token = find_token(session, campaign.account_id, campaign.environment_id, jp_token)
    if token is None:
        raise InvalidParameter("jpToken")
    if token.expires_at <= now:
        raise TokenExpired("interaction token expired")
    return token


def _sender(requested: str | None, sender_ids: list[str], settings: Settings) -> str:
    senders = [normalise_sender(s, settings.default_region) for s in sender_ids]
    if requested:
        sender = normalise_sender(requested, settings.default_region)
        if sender not in senders:
            raise InvalidParameter("from")
        return sender
    if not senders:
        raise InvalidParameter("from")
    return senders[0]


def _find_replay(
    session: Session, account_id: int, command: SendSmsCommand
) -> AcceptedMessage | None:
    earlier = queries.message_by_idempotency_key(session, account_id, command.idempotency_key)
    if earlier is None:
        return None
    if earlier.request_fingerprint != command.fingerprint():
        raise IdempotencyConflict()
    structlog.contextvars.bind_contextvars(messageSid=earlier.sid)
    log.info("message.replayed")
    return AcceptedMessage(sid=earlier.sid, campaign_id=earlier.campaign_id, replayed=True)
