# The entry points. `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
# Fallback: on a fresh machine `install` pip-installs uv, which may not be on PATH yet (pyenv shims).
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-fast lint typecheck check bench docker-setup postgres compose-smoke clean

install: ## Create .venv with every package and tool (uv, locked)
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --quiet --compile-bytecode
	@# Byte-compile our own sources too: with PYTHONDONTWRITEBYTECODE set (as on CI machines),
	@# every process would otherwise re-compile them at start (~5 s per service process).
	@$(RUN) python -m compileall -q -j 0 libs services cli >/dev/null

demo: install docker-setup ## Start a devstack, run a job on the most real engine, show its result, stop
	@$(RUN) python scripts/demo.py

docker-setup: ## Install/start Docker Engine if needed and build the local test images
	@bash scripts/docker-setup.sh

postgres: install ## Make sure a Postgres server is reachable for the tests
	@$(RUN) python scripts/ensure_postgres.py >/dev/null

test: install docker-setup postgres ## The whole suite (unit, integration, e2e) on real NATS/DBs/Docker
	@export SHOAL_TEST_DATABASE_URL="$$($(RUN) python scripts/ensure_postgres.py)"; \
	$(RUN) pytest -n $(PYTEST_WORKERS) --dist loadgroup -q

test-fast: install ## Unit tests only
	@$(RUN) pytest -q -m "not integration and not e2e and not docker"

lint: install
	@$(RUN) ruff check .
	@$(RUN) ruff format --check .
	@$(RUN) lint-imports

typecheck: install
	@$(RUN) mypy libs/common/src libs/client/src services/requester/src services/compute/src services/verifier/src services/publisher/src cli/src

check: lint typecheck test ## What CI runs

bench: install ## Benchmarks; results are appended under benchmarks/results/
	@$(RUN) python benchmarks/run_all.py

compose-smoke: docker-setup ## Build images from a local Debian base, run one job through deploy/docker-compose.yml
	@bash deploy/compose-smoke.sh

clean:
	rm -rf .devstack .state
