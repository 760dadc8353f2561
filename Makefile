# One place for every task; the README and CI call these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SCHEMA := dashboards/schema/node_modules/.package-lock.json

# Install Debian packages as root, through sudo, or say why not (tests then skip outside CI).
apt_install = if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	else echo "warning: cannot install $(1) (not root, no sudo)"; exit 0; fi; \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	apt-get install -y -qq --no-install-recommends $(1) >/dev/null

.PHONY: all demo test lint fmt dashboards system-deps clean

all: fmt dashboards lint test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,demo,dashboards]'
	touch $(STAMP)

# Grafana's own dashboard types (npm @grafana/schema + tsc) for the dashboard schema test.
$(SCHEMA): dashboards/schema/package-lock.json
	@command -v npm >/dev/null || { $(call apt_install,nodejs npm); }
	npm ci --prefix dashboards/schema --no-audit --no-fund --silent

## demo: start an embedded PostgreSQL with a synthetic ledger and serve /metrics on :9853
demo: $(STAMP)
	$(BIN)/resource-exporter demo

## system-deps: Debian's prometheus and alertmanager packages (prometheus, promtool, amtool)
system-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v amtool >/dev/null \
		&& command -v prometheus-alertmanager >/dev/null \
		|| { $(call apt_install,prometheus prometheus-alertmanager); }

## test: install everything, lint, and run the whole suite
test: $(STAMP) $(SCHEMA) system-deps lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## dashboards: regenerate the committed dashboard JSON
dashboards: $(STAMP)
	$(BIN)/python -m dashboards

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis dashboards/schema/node_modules
