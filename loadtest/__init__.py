"""Load tests, benchmarks and the report: scripts run as `python -m loadtest.<name>` from the repository root, all on
one harness (loadtest/probe.py)."""
