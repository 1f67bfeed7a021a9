"""SMS providers: the interface, one adapter per provider, rate limits and circuit breakers."""
