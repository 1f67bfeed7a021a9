"""The accept use case every send edge (REST v3 and v2, SOAP) calls: validate, render, record,
for one request or a group of them (shared/messages/group_commit.py).

Nothing here publishes to the queue: the caller commits first and publishes after, so a
message is never on the queue without being in the database."""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared.accounts.access import (
    authenticate,
    cached_campaign,
    resolve_environment,
    resolve_provider_account,
)
from shared.calls.links import drop_short_link, interaction_link, shorten
from shared.calls.tokens import TokenRef, find_tokens
from shared.core.config_cache import NotCached
from shared.core.errors import (
    CampaignNotFound,
    IdempotencyConflict,
    InvalidParameter,
    RequestRefused,
    TokenExpired,
)
from shared.core.models import Account, Campaign, MessageStatus
from shared.core.settings import Settings
from shared.messages import queries
from shared.messages.queries import EarlierMessage
from shared.text.callback_urls import allowed_networks, refused_url
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
    # When to send it (`sendAt`), if later than now; at most SMSD_SCHEDULE_HORIZON ahead.
    send_at: datetime | None = None
    # Where to POST its status changes (`statusCallback`); else its campaign's, if any.
    status_callback: str | None = None

    def fingerprint(self) -> str:
        """What makes two requests "the same" for an Idempotency-Key: everything but credentials."""
        fields = asdict(self)
        for secret_or_transport in ("application_key", "tenant_id", "idempotency_key"):
            fields.pop(secret_or_transport)
        # Absent, it is left out: the fingerprints of requests without one stay what they were
        # before sendAt existed (a retry across the upgrade still matches its first answer).
        if self.send_at is None:
            fields.pop("send_at")
        else:
            fields["send_at"] = self.send_at.isoformat()
        if self.status_callback is None:
            fields.pop("status_callback")  # likewise, from before statusCallback existed
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AcceptedMessage:
    sid: str
    campaign_id: str
    # True when an Idempotency-Key matched an earlier request: nothing new was recorded.
    replayed: bool = False
    # True when it waits for its sendAt: nothing publishes it before then (the sweeper does).
    scheduled: bool = False


def accept_send(
    session: Session, command: SendSmsCommand, settings: Settings, now: datetime
) -> AcceptedMessage:
    """One send request: `accept_group` of one, its refusal raised."""
    [outcome] = accept_group(session, [command], settings, now)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


Outcome = AcceptedMessage | Exception


@dataclass(slots=True)
class _Request:
    """One request's way through a group: what it has been found to be so far."""

    command: SendSmsCommand
    account: Account | None = None
    campaign: Campaign | None = None
    to_number: str = ""
    outcome: Outcome | None = None


class GroupIO(Protocol):
    """What a group reads and writes besides the cached configuration: `SessionIO` asks the
    session as it goes; the PostgreSQL fast path (`shared.messages.group_sql`) answers from what
    it read for the whole group beforehand and writes what it is given afterwards."""

    def earlier(self, keys: Sequence[tuple[int, str]]) -> Mapping[tuple[int, str], EarlierMessage]:
        """The messages already holding these (account, Idempotency-Key) pairs."""
        ...

    def tokens(self, wanted: Sequence[tuple[int, int, str]]) -> Mapping[TokenKey, TokenRef]:
        """The tokens of these (account, environment, token) triples that exist."""
        ...

    def insert(self, plain: list[dict[str, Any]], keyed: list[dict[str, Any]]) -> set[str]:
        """Write the new messages; the sids of `keyed` that got their key (a concurrent twin
        may hold it)."""
        ...

    def lost_key_race(self, key: tuple[int, str]) -> EarlierMessage | None:
        """The twin that took `key` since `earlier` looked."""
        ...


TokenKey = tuple[int, int, str]


class SessionIO:
    """`GroupIO` through the session, statement by statement."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def earlier(self, keys: Sequence[tuple[int, str]]) -> Mapping[tuple[int, str], EarlierMessage]:
        return queries.messages_by_idempotency_keys(self.session, keys)

    def tokens(self, wanted: Sequence[tuple[int, int, str]]) -> Mapping[TokenKey, TokenRef]:
        return find_tokens(self.session, wanted)

    def insert(self, plain: list[dict[str, Any]], keyed: list[dict[str, Any]]) -> set[str]:
        if plain:
            queries.insert_messages(self.session, plain)
        return queries.insert_keyed_messages(self.session, keyed) if keyed else set()

    def lost_key_race(self, key: tuple[int, str]) -> EarlierMessage | None:
        return next(iter(queries.messages_by_idempotency_keys(self.session, [key]).values()), None)


def accept_group(
    session: Session,
    commands: Sequence[SendSmsCommand],
    settings: Settings,
    now: datetime,
    io: GroupIO | None = None,
) -> list[Outcome]:
    """Check every request of a group in the seed's order of answers and write the messages of
    those that pass; each request's answer, in order: its message, or why it was refused (a
    RequestRefused, or the exception that failed it alone).

    What the requests need from the database is read for the whole group at once (the
    earlier messages of their Idempotency-Keys, their tokens) and the new messages are
    written in one statement per kind, so a group costs a few round trips however many
    requests it holds. A database error fails the whole group: the caller rolls it back and
    answers every request so. `io` (default: the session) does the reading and writing."""
    io = io or SessionIO(session)
    requests = [_Request(command) for command in commands]
    for request in requests:
        with _answering(request):
            request.account = authenticated_account(session, request.command)
    keyed = [r for r in _open(requests) if r.command.idempotency_key]
    if keyed:
        earlier = io.earlier([_key(r) for r in keyed])
        for request in keyed:
            found = earlier.get(_key(request))
            if found is not None:
                with _answering(request):
                    request.outcome = _replay_of(found, request.command)
    for request in _open(requests):
        with _answering(request):
            request.campaign = usable_campaign(
                session,
                _account(request),
                request.command.environment_name,
                request.command.campaign_id,
                now,
            )
            request.to_number = caller_number(request.command.caller_id, settings)
    tokens = io.tokens(
        [
            (_campaign(r).account_id, _campaign(r).environment_id, r.command.jp_token)
            for r in _open(requests)
            if r.command.jp_token
        ]
    )
    rows: list[tuple[_Request, dict[str, Any]]] = []
    for request in _open(requests):
        row: dict[str, Any] = {}
        with _answering(request):
            _message(session, request, tokens, settings, now, row)
            rows.append((request, row))
    _insert(session, io, rows)
    return [request.outcome for request in requests if request.outcome is not None]


def group_reads(
    session: Session, commands: Sequence[SendSmsCommand], now: datetime
) -> tuple[list[tuple[int, str]], list[TokenKey]]:
    """What `accept_group` will ask its `io` to read for these requests: their (account,
    Idempotency-Key) pairs and their (account, environment, token) triples, as far as the
    configuration (the cache, through `session`) tells; a request refused on the way asks
    nothing. Raises NotCached where the cache does not hold what a request needs, and for a
    campaign with short links (each one is a row written as the message is rendered)."""
    keys: list[tuple[int, str]] = []
    tokens: list[TokenKey] = []
    for command in commands:
        try:
            account = authenticated_account(session, command)
            if command.idempotency_key:
                keys.append((account.id, command.idempotency_key))
            campaign = usable_campaign(
                session, account, command.environment_name, command.campaign_id, now
            )
        except RequestRefused:
            continue
        if campaign.link_url and campaign.shorten_links:
            raise NotCached("short links are written one by one")
        if command.jp_token:
            tokens.append((campaign.account_id, campaign.environment_id, command.jp_token))
    return keys, tokens


@contextmanager
def _answering(request: _Request) -> Iterator[None]:
    """A refusal, or any error that is not the database's, answers this request alone; a
    database error fails the group (the transaction can go no further), and NotCached sends
    the whole group to the session path."""
    try:
        yield
    except (DBAPIError, NotCached):
        raise
    except RequestRefused as refused:
        request.outcome = refused
    except Exception as exc:
        log.exception("message.accept_failed")
        request.outcome = exc


def _open(requests: list[_Request]) -> list[_Request]:
    """The requests not answered yet."""
    return [request for request in requests if request.outcome is None]


def _account(request: _Request) -> Account:
    assert request.account is not None
    return request.account


def _campaign(request: _Request) -> Campaign:
    assert request.campaign is not None
    return request.campaign


def _key(request: _Request) -> tuple[int, str]:
    return (_account(request).id, request.command.idempotency_key or "")


def _message(
    session: Session,
    request: _Request,
    tokens: Mapping[TokenKey, TokenRef],
    settings: Settings,
    now: datetime,
    message: dict[str, Any],
) -> None:
    """The rest of the checks; fills `message` with the row to insert."""
    command, account, campaign = request.command, _account(request), _campaign(request)
    token = usable_token(campaign, command.jp_token, tokens, now, required=command.require_token)
    params = additional_params(command.additional_params)
    provider_account = resolve_provider_account(
        session, account, now, from_system=command.from_system_account
    )
    sender = chosen_sender(command.sender, provider_account.sender_ids, settings)
    scheduled = scheduled_for(command.send_at, settings, now)
    callback = status_callback_for(command.status_callback, campaign, settings)
    link = (
        build_link(campaign.link_url, params, token.token if token else None)
        if campaign.link_url
        else None
    )
    message.update(
        sid=new_message_sid(),
        account_id=account.id,
        environment_id=campaign.environment_id,
        campaign_pk=campaign.id,
        campaign_id=campaign.campaign_id,
        token_id=token.id if token else None,
        to_number=request.to_number,
        from_number=sender,
        status=MessageStatus.QUEUED.value,
        provider=provider_account.provider,
        provider_account_id=provider_account.id,
        idempotency_key=command.idempotency_key,
        request_fingerprint=command.fingerprint() if command.idempotency_key else None,
        created_at=now,
        updated_at=now,
        # Validity counts from when it may be sent.
        expires_at=(scheduled or now) + settings.message_validity,
        next_attempt_at=scheduled,
        status_callback=callback,
    )

    def render(shown: str | None) -> None:
        message["body"] = render_text(campaign.message_text, shown)
        size = measure(message["body"])
        if size.segments > campaign.max_segments:
            # Blame the caller's parameters only if the text fits without them; otherwise the
            # campaign is over its own limit. Nothing is added (its short link neither).
            log.info(
                "message.too_long",
                segments=size.segments,
                max_segments=campaign.max_segments,
                encoding=size.encoding,
                units=size.units,
            )
            raise InvalidParameter(
                "additionalParams" if params_made_it_long(campaign, token, params) else "campaignId"
            )
        message["segments"] = size.segments
        message["encoding"] = size.encoding

    if link and campaign.shorten_links:
        # The short link is written now; a refusal below takes it back with the savepoint.
        with session.begin_nested():
            message["short_url"] = shorten(
                session,
                account.id,
                link,
                token.id if token else None,
                settings,
                now,
                sent_at=scheduled,
            )
            render(message["short_url"])
    else:
        render(link)


def status_callback_for(asked: str | None, campaign: Campaign, settings: Settings) -> str | None:
    """Where a message's status changes go: the URL the request gave (refused, a 400, when it
    is not one we may POST to), else its campaign's."""
    if asked is None:
        return campaign.status_callback
    if refused_url(asked, allowed_networks(settings.status_callback_allowed_networks)):
        raise InvalidParameter("statusCallback")
    return asked


def scheduled_for(send_at: datetime | None, settings: Settings, now: datetime) -> datetime | None:
    """When a message asked for `send_at` is due: None for now (no sendAt, or one that has
    come), else that time; refused past SMSD_SCHEDULE_HORIZON ahead."""
    if send_at is None or send_at <= now:
        return None
    if send_at > now + settings.schedule_horizon:
        raise InvalidParameter("sendAt")
    return send_at.astimezone(UTC)


def _insert(session: Session, io: GroupIO, rows: list[tuple[_Request, dict[str, Any]]]) -> None:
    """Write the group's new messages: one statement for those without an Idempotency-Key,
    one for those with, where a concurrent twin (another group, another process) may have
    taken the key since we looked: that request is then answered with the twin's message."""
    plain = [_columns(row) for _, row in rows if not row["idempotency_key"]]
    keyed = [_columns(row) for _, row in rows if row["idempotency_key"]]
    taken = io.insert(plain, keyed)
    for request, row in rows:
        if row["idempotency_key"] and row["sid"] not in taken:
            if short_url := row.get("short_url"):
                drop_short_link(session, short_url)
            with _answering(request):
                request.outcome = _lost_key_race(io, request)
            continue
        log.info(
            "message.accepted",
            messageSid=row["sid"],
            account=_account(request).tenant_id,
            campaign=row["campaign_id"],
            to=row["to_number"],
            provider=row["provider"],
        )
        request.outcome = AcceptedMessage(
            sid=row["sid"],
            campaign_id=row["campaign_id"],
            scheduled=row["next_attempt_at"] is not None,
        )


def _columns(row: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in row.items() if name != "short_url"}


def _lost_key_race(io: GroupIO, request: _Request) -> AcceptedMessage:
    row = io.lost_key_race(_key(request))
    if row is None:
        raise RuntimeError("an Idempotency-Key insert lost to a twin that cannot be found")
    return _replay_of(row, request.command)


def notify_external_send(
    session: Session, command: SendSmsCommand, settings: Settings, now: datetime
) -> str:
    """Notify SMS: the caller's own gateway sent the campaign; record `smsSent` for the call.

    Same checks and answers as a send, but nothing is queued and no provider is needed.
    Returns the jpToken whose call was marked."""
    account = authenticated_account(session, command)
    campaign = usable_campaign(session, account, command.environment_name, command.campaign_id, now)
    caller_number(command.caller_id, settings)
    tokens = (
        find_tokens(session, [(campaign.account_id, campaign.environment_id, command.jp_token)])
        if command.jp_token
        else {}
    )
    token = usable_token(campaign, command.jp_token, tokens, now, required=True)
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


def params_made_it_long(
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


def caller_number(caller_id: str | None, settings: Settings) -> str:
    to_number = to_e164(caller_id, settings.default_region) if caller_id else None
    if to_number is None:
        raise InvalidParameter("callerId")
    return to_number


def usable_token(
    campaign: Campaign,
    jp_token: str | None,
    tokens: Mapping[tuple[int, int, str], TokenRef],
    now: datetime,
    *,
    required: bool,
) -> TokenRef | None:
    if not jp_token:
        if required:
            raise InvalidParameter("jpToken")
        return None
    # A token of this account and environment: a DEV call's token never reaches PROD.
    token = tokens.get((campaign.account_id, campaign.environment_id, jp_token))
    if token is None:
        raise InvalidParameter("jpToken")
    if token.expires_at <= now:
        raise TokenExpired("interaction token expired")
    return token


def chosen_sender(requested: str | None, sender_ids: list[str], settings: Settings) -> str:
    senders = [_normalised_sender(s, settings.default_region) for s in sender_ids]
    if requested:
        sender = _normalised_sender(requested, settings.default_region)
        if sender not in senders:
            raise InvalidParameter("from")
        return sender
    if not senders:
        raise InvalidParameter("from")
    return senders[0]


@functools.lru_cache(maxsize=4096)
def _normalised_sender(raw: str, region: str) -> str:
    # Parsing a number is a tenth of an accept's CPU; an account's senders are few.
    return normalise_sender(raw, region)


def _replay_of(earlier: EarlierMessage, command: SendSmsCommand) -> AcceptedMessage:
    """The answer to a request whose Idempotency-Key an earlier message holds."""
    if earlier.request_fingerprint != command.fingerprint():
        raise IdempotencyConflict()
    log.info("message.replayed", messageSid=earlier.sid)
    return AcceptedMessage(sid=earlier.sid, campaign_id=earlier.campaign_id, replayed=True)
