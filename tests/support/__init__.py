"""Helpers the test suites share; conftest.py files hold only fixtures and import from here.

- data: the demo tenants, keys and numbers, the demo accounts, request headers
- processes: the repository root, real child processes and waiting for them
- services: throwaway PostgreSQL, Redis and RabbitMQ servers, free ports
- api: API requests and what they left behind (queues, rows)
- messages: messages made through the real accept path and read back
- providers: provider settings pointing the real SDKs at the simulator; webhook signing
- metrics: reading Prometheus expositions
- sql: counting the SQL the engine runs
"""
