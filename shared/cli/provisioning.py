"""`sms-dispatch` provisioning commands: accounts and their keys, environments, campaigns,
provider settings, interaction tokens, and the demo account (`seed-demo`), so nobody edits the
database by hand. What they change is decided in `shared.accounts.provisioning`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import click
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.accounts.access import CALLBACK_TOKEN, resolve_environment
from shared.accounts.provisioning import (
    add_application_key,
    add_environment,
    create_account,
    ensure_account,
    find_provider,
    get_account,
    has_provider,
    rotate_callback_token,
    set_default_environment,
    set_provider,
    set_provider_rates,
    upsert_campaign,
)
from shared.accounts.webhook_secrets import current_secret, rotate_secret
from shared.calls.tokens import issue_token
from shared.core.db import Database
from shared.core.errors import InvalidParameter, RequestRefused
from shared.core.models import ProviderAccount, utcnow
from shared.core.settings import get_settings
from shared.text.callback_urls import parse_callback_url
from shared.text.phone import to_e164
from shared.text.quiet_hours import parse_quiet_hours

DEMO_TENANT = "12345678"
DEMO_KEY = "53736e07e4b05772e6475c2d"  # the seed document's sample key, for the local demo only
DEMO_SENDER = "+12121234567"


@contextmanager
def _transaction() -> Iterator[Session]:
    """A provisioning transaction whose ordinary mistakes read as one line, not a traceback."""
    db = Database(get_settings())
    try:
        with db.transaction() as session:
            yield session
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    except IntegrityError as exc:
        raise click.ClickException(
            f"that would duplicate an existing record ({exc.orig})"
        ) from None
    except RequestRefused as exc:
        what = f"unknown {exc.parameter}" if isinstance(exc, InvalidParameter) else exc.text
        raise click.ClickException(what) from None
    finally:
        db.dispose()


@click.group()
def account() -> None:
    """Accounts and their application keys."""


@account.command("create")
@click.argument("tenant_id")
@click.option("--name", required=True)
@click.option("--environment", "default_environment", default="PROD", show_default=True)
def account_create(tenant_id: str, name: str, default_environment: str) -> None:
    """Create an account (tenant id `system` makes the system account) and print its key."""
    with _transaction() as session:
        created = create_account(session, tenant_id, name, default_environment)
        key = None if created.is_system else add_application_key(session, created)
    click.echo(f"account {tenant_id} created")
    if key:
        click.echo(f"Application-Key: {key}  (shown once; only its hash is stored)")


@account.command("rotate-key")
@click.argument("tenant_id")
@click.option("--revoke-old/--keep-old", default=False, help="Revoke existing keys now.")
def account_rotate_key(tenant_id: str, revoke_old: bool) -> None:
    """Issue a new application key; old keys stay valid unless --revoke-old."""
    with _transaction() as session:
        found = get_account(session, tenant_id)
        key = add_application_key(session, found, revoke_others=revoke_old)
    click.echo(f"Application-Key: {key}  (shown once; only its hash is stored)")


@account.command("webhook-secret")
@click.argument("tenant_id")
@click.option(
    "--rotate",
    is_flag=True,
    help="Issue a new secret; the old one keeps signing for SMSD_WEBHOOK_SECRET_OVERLAP.",
)
def account_webhook_secret(tenant_id: str, rotate: bool) -> None:
    """Print the secret the account's status callbacks are signed with (made if none)."""
    with _transaction() as session:
        found = get_account(session, tenant_id)
        now = utcnow()
        secret = (
            rotate_secret(session, found.id, now)
            if rotate
            else current_secret(session, found.id, now)
        )
    click.echo(f"Webhook-Secret: {secret}")
    if rotate:
        overlap = get_settings().webhook_secret_overlap
        click.echo(f"(the previous secret also signs for {overlap} more)")


@click.group()
def environment() -> None:
    """Environments of an account."""


@environment.command("add")
@click.argument("tenant_id")
@click.argument("name")
@click.option("--default", "make_default", is_flag=True, help="Make it the account's default.")
def environment_add(tenant_id: str, name: str, make_default: bool) -> None:
    with _transaction() as session:
        found = get_account(session, tenant_id)
        add_environment(session, found, name)
        if make_default:
            set_default_environment(session, found, name)
    click.echo(f"environment {name} on {tenant_id}")


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise click.BadParameter(f"{value!r} needs a timezone, e.g. {value}+00:00")
    return parsed


@click.group()
def campaign() -> None:
    """Campaigns of an account's environment."""


@campaign.command("set")
@click.argument("tenant_id")
@click.argument("campaign_id")
@click.option("--environment", "environment_name", default=None, help="Default: the account's.")
@click.option("--name", required=True)
@click.option("--text", "message_text", required=True, help="Message text with <link>.")
@click.option("--link", "link_url", default=None)
@click.option("--inactive", is_flag=True)
@click.option("--shorten", is_flag=True, help="Send /l/<code> short links (counts clicks).")
@click.option("--valid-from", default=None, help="ISO 8601 with timezone.")
@click.option("--valid-until", default=None, help="ISO 8601 with timezone.")
@click.option(
    "--status-callback",
    default=None,
    help="POST its messages' status changes here when a send names no statusCallback.",
)
@click.option(
    "--quiet-hours",
    default=None,
    help="HH:MM-HH:MM in the recipient's local time (e.g. 21:00-08:00): bulk texts wait it out.",
)
def campaign_set(
    tenant_id: str,
    campaign_id: str,
    environment_name: str | None,
    name: str,
    message_text: str,
    link_url: str | None,
    inactive: bool,
    shorten: bool,
    valid_from: str | None,
    valid_until: str | None,
    quiet_hours: str | None,
    status_callback: str | None,
) -> None:
    """Create or update a campaign."""
    if status_callback is not None and parse_callback_url(status_callback) is None:
        raise click.BadParameter("an absolute http or https URL", param_hint="--status-callback")
    if quiet_hours is not None:
        try:
            parse_quiet_hours(quiet_hours)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--quiet-hours") from exc
    with _transaction() as session:
        found = get_account(session, tenant_id)
        env = resolve_environment(session, found, environment_name)
        upsert_campaign(
            session,
            env,
            campaign_id,
            name=name,
            message_text=message_text,
            link_url=link_url,
            active=not inactive,
            shorten_links=shorten,
            valid_from=_when(valid_from),
            valid_until=_when(valid_until),
            quiet_hours=quiet_hours,
            status_callback=status_callback,
        )
    click.echo(f"campaign {campaign_id} saved")


@click.group()
def provider() -> None:
    """Telephony provider settings."""


@provider.command("set")
@click.argument("tenant_id")
@click.argument("provider_name")
@click.option("--sender", "senders", multiple=True, required=True, help="Repeat for several.")
@click.option("--credential", "credentials", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--expires-at", default=None, help="ISO 8601 with timezone.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--sender-rate", type=float, default=None, help="Segments/s per sender number.")
@click.option("--account-rate", type=float, default=None, help="Segments/s for these settings.")
def provider_set(
    tenant_id: str,
    provider_name: str,
    senders: tuple[str, ...],
    credentials: tuple[str, ...],
    expires_at: str | None,
    priority: int,
    sender_rate: float | None,
    account_rate: float | None,
) -> None:
    """Set an account's provider, its senders and credentials (never echoed back).

    Several providers at different priorities make a failover chain."""
    from shared.providers.registry import missing_credentials, provider_names

    if provider_name not in provider_names():
        raise click.BadParameter(f"choose one of {', '.join(provider_names())}")
    pairs: dict[str, Any] = {}
    for item in credentials:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        pairs[key] = value
    if missing := missing_credentials(provider_name, pairs):
        raise click.BadParameter(f"{provider_name} needs the credentials {', '.join(missing)}")
    with _transaction() as session:
        found = get_account(session, tenant_id)
        settings_row = set_provider(
            session,
            found,
            provider_name,
            sender_ids=list(senders),
            credentials=pairs,
            expires_at=_when(expires_at),
            priority=priority,
        )
        set_provider_rates(
            session, settings_row, sender_rate=sender_rate, account_rate=account_rate
        )
        webhook_urls = _webhook_urls(settings_row)
    click.echo(f"provider {provider_name} set for {tenant_id} ({len(pairs)} credentials)")
    for line in webhook_urls:
        click.echo(line)


@provider.command("rotate-callback-token")
@click.argument("tenant_id")
@click.option("--priority", type=int, default=0, show_default=True)
def provider_rotate_callback_token(tenant_id: str, priority: int) -> None:
    """Issue a new secret for the Vonage webhook URLs; the previous one keeps working until
    the next rotation, so set the new URLs in the Vonage dashboard, then rotate again later
    to retire the old secret for good."""
    with _transaction() as session:
        found = get_account(session, tenant_id)
        settings_row = find_provider(session, found, "vonage", priority)
        if settings_row is None:
            raise click.ClickException(f"{tenant_id} has no vonage settings at priority {priority}")
        rotate_callback_token(session, settings_row)
        webhook_urls = _webhook_urls(settings_row)
    for line in webhook_urls:
        click.echo(line)


def _webhook_urls(settings_row: ProviderAccount) -> list[str]:
    """What to paste into the provider's dashboard (the Vonage ones carry a secret)."""
    base = get_settings().public_base_url.rstrip("/")
    if settings_row.provider == "vonage":
        token = settings_row.credentials[CALLBACK_TOKEN]
        return [
            f"delivery receipts: {base}/callbacks/vonage/{token}",
            f"inbound SMS:       {base}/inbound/vonage/{token}",
        ]
    if settings_row.provider == "twilio":
        return [f"inbound SMS:       {base}/inbound/twilio"]
    return []


@click.group()
def token() -> None:
    """Interaction tokens."""


@token.command("issue")
@click.argument("tenant_id")
@click.argument("caller_id")
@click.option("--environment", "environment_name", default=None)
@click.option("--lifetime", type=int, default=None, help="Seconds (default: SMSD_TOKEN_LIFETIME).")
def token_issue(
    tenant_id: str, caller_id: str, environment_name: str | None, lifetime: int | None
) -> None:
    """Issue a jpToken, as generateToken does."""
    settings = get_settings()
    caller = to_e164(caller_id, settings.default_region)
    if caller is None:
        raise click.BadParameter(f"{caller_id!r} is not a phone number")
    with _transaction() as session:
        found = get_account(session, tenant_id)
        env = resolve_environment(session, found, environment_name)
        span = timedelta(seconds=lifetime) if lifetime else settings.token_lifetime
        issued = issue_token(session, found, env, caller, span, utcnow())
    click.echo(json.dumps({"jpToken": issued.token, "expiresAt": issued.expires_at.isoformat()}))


@click.command("seed-demo")
def seed_demo() -> None:
    """Create the demo account, campaign and simulator provider (safe to run again)."""
    with _transaction() as session:
        account = ensure_account(session, DEMO_TENANT, "Demo account")
        add_application_key(session, account, DEMO_KEY)
        environment = resolve_environment(session, account, None)
        upsert_campaign(
            session,
            environment,
            "campaign1",
            name="Demo deflection",
            message_text="Skip the queue: continue here <link>",
            link_url="https://example.com/flow",
        )
        if not has_provider(session, account):
            set_provider(session, account, "simulator", sender_ids=[DEMO_SENDER])
    click.echo(f"demo account {DEMO_TENANT} ready")


# What `shared.cli` adds to `sms-dispatch`.
COMMANDS: tuple[click.Command, ...] = (account, environment, campaign, provider, token, seed_demo)
