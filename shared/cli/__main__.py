"""`python -m shared.cli`: the same as the `sms-dispatch` command."""

from shared.cli import main

main()
