"""A Django project with promfork: HTTP metrics, an aggregated /metrics, and one metric of its own."""
