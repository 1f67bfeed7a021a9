"""The demo tenants, keys and numbers the suites share, the demo accounts built from them, and
the headers that authenticate as them."""

from __future__ import annotations

from dataclasses import dataclass

from shared.accounts import access, provisioning
from shared.core.db import Database

TENANT = "12345678"
KEY = "53736e07e4b05772e6475c2d"
OTHER_TENANT = "87654321"
OTHER_KEY = "0123456789abcdef01234567"
SENDER = "+12121234567"
CALLER = "+972 54 4696388"
CALLER_E164 = "+972544696388"


@dataclass(frozen=True)
class Demo:
    tenant: str
    key: str
    account_id: int


def headers(tenant: str = TENANT, key: str = KEY, **extra: str) -> dict[str, str]:
    return {"Tenant-Id": tenant, "Application-Key": key, **extra}


def create_demo(db: Database) -> Demo:
    """The seed's account with campaign1 on the simulator, and a second account beside it."""
    with db.transaction() as session:
        account = provisioning.create_account(session, TENANT, "Demo", "PROD")
        provisioning.add_application_key(session, account, KEY)
        prod = access.resolve_environment(session, account, None)
        provisioning.add_environment(session, account, "DEV")
        provisioning.upsert_campaign(
            session,
            prod,
            "campaign1",
            name="Deflection",
            message_text="Please click here <link>",
            link_url="https://flows.example.com/start?lang=en",
        )
        provisioning.set_provider(session, account, "simulator", sender_ids=[SENDER, "ACME"])
        other = provisioning.create_account(session, OTHER_TENANT, "Other", "PROD")
        provisioning.add_application_key(session, other, OTHER_KEY)
        other_prod = access.resolve_environment(session, other, None)
        provisioning.upsert_campaign(
            session, other_prod, "other-campaign", name="x", message_text="<link>", link_url=None
        )
        provisioning.set_provider(session, other, "simulator", sender_ids=["+12025550143"])
        return Demo(tenant=TENANT, key=KEY, account_id=account.id)
