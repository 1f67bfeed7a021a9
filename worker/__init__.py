"""Celery: the send task, the sweeper, and the app that runs them."""
