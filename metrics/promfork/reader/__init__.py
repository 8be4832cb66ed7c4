"""Runs in whichever process serves a scrape.

incremental: the long-lived reader; merge: the exact merge; collector: the aggregating
collector and registry; exposition: the /metrics app; listener: the master's METRICS_PORT
listener; process: per-slot process metrics.
"""
