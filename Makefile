# promfork: `make run` serves the gateway, `make test` runs the whole suite, `make test-fast` every test
# that starts no server (no Gunicorn, Prometheus or other server process).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench clean system-deps

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,load]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/gunicorn -c gunicorn.conf.py

# prometheus and promtool come from Debian's `prometheus` package, prometheus-alertmanager and
# amtool from `prometheus-alertmanager`; installed when missing and we may (root with apt-get),
# otherwise the tests that need them say so.
system-deps:
	@if ! { command -v promtool && command -v amtool; } >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus prometheus-alertmanager >/dev/null; \
	fi

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check metrics webapp tests bench gunicorn.conf.py examples
	$(VENV)/bin/pytest

test-fast: $(STAMP) system-deps
	$(VENV)/bin/ruff check metrics webapp tests bench gunicorn.conf.py examples
	$(VENV)/bin/pytest -m "not integration and not deploy and not chaos"

lint: $(STAMP)
	$(VENV)/bin/ruff check metrics webapp tests bench gunicorn.conf.py examples
	$(VENV)/bin/ruff format --check metrics webapp tests bench gunicorn.conf.py examples

# Benchmarks print ratios measured in one run; not part of `make test`.
bench: $(STAMP)
	@if ! { command -v wrk && command -v valgrind; } >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk valgrind >/dev/null; \
	fi
	$(PY) -m pip install --quiet prometheus-flask-exporter opentelemetry-sdk-extension-prometheus-multiprocess
	$(PY) bench/scrape_cost.py
	$(PY) bench/master_port.py
	$(PY) bench/instructions.py
	$(PY) bench/overhead.py
	$(PY) bench/series_count.py
	$(PY) bench/otel.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
