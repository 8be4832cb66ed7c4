"""Helpers the tests share, one concern per module; fixtures stay in tests/conftest.py.

* servers: start the gateway (``Gunicorn``) or a user's project (``ExampleServer``) under
  Gunicorn, or a start that must fail; free ports, a clean environment, stopping a child
  process, waiting for a condition;
* client: HTTP requests, chat completions and their SSE, scraping and reading /metrics;
* checks: assertions on scrapes and configs (counters never decrease; a user's gunicorn.conf.py);
* exactness: totals judged with kills (the client's tally, requests in doubt, scrapes during a kill);
* churn: the churn + kill -9 scenario run against a server;
* wheel: a clean virtualenv with promfork installed from a wheel of this checkout;
* exemplars, fleet, genai_truth, upstream: the helpers of one test module each.

Not here: the scripts the tests run by path in a fresh interpreter (tests/workload.py,
tests/*_workload.py) and the apps they serve (tests/apps/, tests/dirty_pool/).
"""
