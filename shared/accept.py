"""The accept path shared by every edge (REST v3 now, SOAP and v2 later): validate, render, record.

Nothing here publishes to the queue: the caller commits first and publishes after, so a
message is never on the queue without being in the database."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.accounts import (
    authenticate,
    find_campaign,
    resolve_environment,
    resolve_provider_account,
)
from shared.errors import CampaignNotFound, IdempotencyConflict, InvalidParameter, TokenExpired
from shared.models import Message, MessageStatus
from shared.phone import normalise_sender, to_e164
from shared.rendering import build_link, parse_additional_params, render_text
from shared.settings import Settings
from shared.tokens import find_token

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
    account = authenticate(
        session, command.account_in_url, command.tenant_id, command.application_key
    )
    structlog.contextvars.bind_contextvars(account=account.tenant_id, campaign=command.campaign_id)
    if command.invalid_parameter:
        raise InvalidParameter(command.invalid_parameter)

    if command.idempotency_key:
        earlier = _find_replay(session, account.id, command)
        if earlier is not None:
            return earlier

    environment = resolve_environment(session, account, command.environment_name)
    campaign = find_campaign(session, environment, command.campaign_id)
    if campaign is None:
        raise CampaignNotFound(command.campaign_id)
    if not campaign.active:
        raise TokenExpired("campaign inactive")
    if (campaign.valid_from and campaign.valid_from > now) or (
        campaign.valid_until and campaign.valid_until <= now
    ):
        raise TokenExpired("campaign outside its validity")

    if not command.caller_id:
        raise InvalidParameter("callerId")
    to_number = to_e164(command.caller_id, settings.default_region)
    if to_number is None:
        raise InvalidParameter("callerId")

    token = None
    if command.jp_token:
        token = find_token(session, account, command.jp_token)
        if token is None:
            raise InvalidParameter("jpToken")
        if token.expires_at <= now:
            raise TokenExpired("interaction token expired")
    elif command.require_token:
        raise InvalidParameter("jpToken")

    params: list[tuple[str, str]] = []
    if command.additional_params:
        parsed = parse_additional_params(command.additional_params)
        if parsed is None:
            raise InvalidParameter("additionalParams")
        params = parsed

    provider_account = resolve_provider_account(
        session, account, now, from_system=command.from_system_account
    )
    senders = [normalise_sender(s, settings.default_region) for s in provider_account.sender_ids]
    if command.sender:
        sender = normalise_sender(command.sender, settings.default_region)
        if sender not in senders:
            raise InvalidParameter("from")
    elif senders:
        sender = senders[0]
    else:
        raise InvalidParameter("from")

    link = build_link(campaign.link_url, params, command.jp_token) if campaign.link_url else None
    message = Message(
        sid=new_message_sid(),
        account_id=account.id,
        environment_id=environment.id,
        campaign_pk=campaign.id,
        campaign_id=campaign.campaign_id,
        token_id=token.id if token else None,
        to_number=to_number,
        from_number=sender,
        body=render_text(campaign.message_text, link),
        status=MessageStatus.QUEUED.value,
        provider=provider_account.provider,
        provider_account_id=provider_account.id,
        idempotency_key=command.idempotency_key,
        request_fingerprint=command.fingerprint() if command.idempotency_key else None,
        created_at=now,
        updated_at=now,
        expires_at=now + settings.message_validity,
    )
    if command.idempotency_key:
        # A concurrent twin with the same key may win the insert: answer with its message.
        try:
            with session.begin_nested():
                session.add(message)
        except IntegrityError:
            replay = _find_replay(session, account.id, command)
            if replay is None:
                raise
            return replay
    else:
        session.add(message)
    structlog.contextvars.bind_contextvars(messageSid=message.sid)
    log.info("message.accepted", to=to_number, provider=provider_account.provider)
    return AcceptedMessage(sid=message.sid, campaign_id=campaign.campaign_id)


def _find_replay(
    session: Session, account_id: int, command: SendSmsCommand
) -> AcceptedMessage | None:
    earlier = session.execute(
        select(Message.sid, Message.campaign_id, Message.request_fingerprint).where(
            Message.account_id == account_id, Message.idempotency_key == command.idempotency_key
        )
    ).first()
    if earlier is None:
        return None
    if earlier.request_fingerprint != command.fingerprint():
        raise IdempotencyConflict()
    structlog.contextvars.bind_contextvars(messageSid=earlier.sid)
    log.info("message.replayed")
    return AcceptedMessage(sid=earlier.sid, campaign_id=earlier.campaign_id, replayed=True)
