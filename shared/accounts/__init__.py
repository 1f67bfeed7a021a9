"""Accounts: who a request acts for (authentication and resolution) and provisioning."""
