"""Reference apps for bench/overhead.py: the same gateway handler under other instrumentation."""
