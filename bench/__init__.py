"""`make bench`: throughput and latency of sms-dispatch on this machine, each against a floor."""
