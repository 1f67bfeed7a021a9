"""`python -m shared.cli`: the same as the `sms-dispatch` command."""

from shared.cli import main

# Guarded: a process pool's spawned children (the bulk NumberPool) import the parent's main
# module again, and must not start another copy of the command.
if __name__ == "__main__":
    main()
