"""promfork-load: load-test the gateway with many workers and check that /metrics adds up."""
