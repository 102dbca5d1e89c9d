# The two commands the README promises, plus the pieces they are made of.
PYTHON ?= python3

.PHONY: run test install install-test lint bench

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e '.[test]'
	bash scripts/ensure-postgres.sh
	bash scripts/ensure-browser.sh
	bash scripts/ensure-java.sh

# Run the whole system on its embedded defaults: tansu broker, service (SQLite + generated
# key under .killswitch/), detector. Ctrl-C (or `killswitch down`) stops everything.
run: install
	killswitch up

# The whole test suite (SQLite and a throwaway PostgreSQL, headless Chromium, Apache Kafka
# on Java 17+ with Maven, ruff, mypy).
test: install-test
	$(PYTHON) -m pytest

lint:
	ruff check . && ruff format --check . && mypy

bench: install
	$(PYTHON) bench/issue.py
