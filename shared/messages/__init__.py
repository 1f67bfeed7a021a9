"""A message's life: accept, claim, send, outbox, lifecycle, opt-outs, reconciliation."""
