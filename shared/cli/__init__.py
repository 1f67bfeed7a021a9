"""`sms-dispatch`: one command for every process and for provisioning.

This module only assembles the group: the process commands are in `shared.cli.launcher`, the
provisioning commands in `shared.cli.provisioning`."""

from __future__ import annotations

import click

from shared.cli import launcher, provisioning


@click.group()
def main() -> None:
    """sms-dispatch: the Interact Send SMS API, queued through Celery."""


for _command in (*launcher.COMMANDS, *provisioning.COMMANDS):
    main.add_command(_command)
