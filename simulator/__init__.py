"""A stand-in SMS provider for local runs, tests and benchmarks (`sms-dispatch simulator`)."""
