"""Provisioning through `sms-dispatch`, so nobody edits the database by hand."""

from __future__ import annotations

import json
import re
from datetime import timedelta

from click.testing import CliRunner
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select

from shared.accounts.webhook_secrets import signing_secrets
from shared.cli import main
from shared.core.db import Database
from shared.core.models import Account, Campaign, utcnow

BASE = "/interact/version/3/account/555/resources"


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def key_from(output: str) -> str:
    match = re.search(r"Application-Key: ([0-9a-f]{24})", output)
    assert match, output
    return match.group(1)


def provision() -> str:
    key = key_from(run("account", "create", "555", "--name", "Acme"))
    run("environment", "add", "555", "DEV")
    run(
        "campaign",
        "set",
        "555",
        "spring",
        "--name",
        "Spring",
        "--text",
        "Go <link>",
        "--link",
        "https://acme.example/flow",
    )
    run(
        "provider",
        "set",
        "555",
        "simulator",
        "--sender",
        "+12025550143",
        "--credential",
        "x=secret",
    )
    return key


def test_a_provisioned_account_can_send(client: TestClient[Litestar], db: Database) -> None:
    key = provision()
    token = json.loads(run("token", "issue", "555", "+1 202 555 0143"))["jpToken"]
    response = client.post(
        f"{BASE}/campaign/sms/spring",
        headers={"Tenant-Id": "555", "Application-Key": key},
        json={"callerId": "+1 202 555 0143", "jpToken": token},
    )
    assert response.status_code == 200, response.text


def test_provider_credentials_are_never_echoed(db: Database) -> None:
    provision()
    output = run(
        "provider", "set", "555", "simulator", "--sender", "+1202", "--credential", "x=hunter2"
    )
    assert "hunter2" not in output


def test_rotating_with_revoke_old_invalidates_the_old_key(
    client: TestClient[Litestar], db: Database
) -> None:
    old = provision()
    new = key_from(run("account", "rotate-key", "555", "--revoke-old"))
    for key, status in ((old, 401), (new, 200)):
        response = client.get(
            f"{BASE}/reports/deflected-calls", headers={"Tenant-Id": "555", "Application-Key": key}
        )
        assert response.status_code == status


def test_rotating_without_revoke_keeps_both_keys_valid(
    client: TestClient[Litestar], db: Database
) -> None:
    old = provision()
    new = key_from(run("account", "rotate-key", "555"))
    for key in (old, new):
        response = client.get(
            f"{BASE}/reports/deflected-calls", headers={"Tenant-Id": "555", "Application-Key": key}
        )
        assert response.status_code == 200


def fails(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result.output


def test_ordinary_mistakes_are_one_line_errors_not_tracebacks(db: Database) -> None:
    provision()
    assert "duplicate" in fails("account", "create", "555", "--name", "Again")
    assert "no account '999'" in fails("account", "rotate-key", "999")
    assert "unknown Environment-Name" in fails(
        "token", "issue", "555", "+12025550143", "--environment", "NOPE"
    )


def test_provider_settings_missing_a_credential_are_refused(db: Database) -> None:
    provision()
    result = CliRunner().invoke(
        main,
        [
            "provider",
            "set",
            "555",
            "twilio",
            "--sender",
            "+12025550143",
            "--credential",
            "account_sid=AC1",
            "--credential",
            "authtoken=typo",
        ],
    )
    assert result.exit_code == 2
    assert "twilio needs the credentials auth_token" in result.output


def test_a_campaigns_quiet_hours_are_set_and_a_wrong_window_is_refused(db: Database) -> None:
    provision()
    spring = ["campaign", "set", "555", "spring", "--name", "Spring", "--text", "Go"]
    run(*spring, "--quiet-hours", "21:00-08:00")
    with db.transaction() as session:
        stored = session.scalars(
            select(Campaign.quiet_hours).where(Campaign.campaign_id == "spring")
        )
        assert stored.one() == "21:00-08:00"

    refused = CliRunner().invoke(main, [*spring, "--quiet-hours", "9pm-8am"])

    assert refused.exit_code == 2
    assert "quiet hours must be HH:MM-HH:MM" in refused.output


def test_the_webhook_secret_is_shown_then_rotated_with_the_old_one_signing_for_the_overlap(
    db: Database,
) -> None:
    provision()
    shown = re.search(r"Webhook-Secret: (whsec_\S+)", run("account", "webhook-secret", "555"))
    assert shown, "no secret printed"
    again = run("account", "webhook-secret", "555")
    assert shown.group(1) in again  # shown again, not a new one each time
    rotated = run("account", "webhook-secret", "555", "--rotate")
    new = re.search(r"Webhook-Secret: (whsec_\S+)", rotated)
    assert new, rotated
    assert new.group(1) != shown.group(1)
    assert "previous secret also signs" in rotated
    with db.transaction() as session:
        account_id = session.scalar(select(Account.id).where(Account.tenant_id == "555"))
        assert account_id is not None
        signing = signing_secrets(session, {account_id}, utcnow(), timedelta(hours=24))
        assert signing[account_id] == [new.group(1), shown.group(1)]  # the current one first
        assert signing_secrets(session, {account_id}, utcnow(), timedelta(0))[account_id] == [
            new.group(1)
        ]


def test_a_campaigns_status_callback_is_set_and_a_non_url_is_refused(db: Database) -> None:
    provision()
    spring = ["campaign", "set", "555", "spring", "--name", "Spring", "--text", "Go"]
    run(*spring, "--status-callback", "https://acme.example/sms/status")
    with db.transaction() as session:
        stored = session.scalars(
            select(Campaign.status_callback).where(Campaign.campaign_id == "spring")
        )
        assert stored.one() == "https://acme.example/sms/status"

    refused = CliRunner().invoke(main, [*spring, "--status-callback", "acme.example/x"])

    assert refused.exit_code == 2
    assert "an absolute http or https URL" in refused.output
