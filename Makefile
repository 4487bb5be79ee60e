# convserve: every set-up step lives here, so a fresh machine with only python3 needs two commands:
#   make serve   create .venv, install convserve[server] (no torch, no test tools), serve the bundled model
#   make test    create .venv, install convserve[dev] and the system packages the tests use, run every test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Re-install when the dependency list changes. Serving needs only convserve[server] (no torch, no test
# tools); the dev install (tests, training, docs) is a superset, so it satisfies `make serve` too.
DEPS       := $(shell cksum pyproject.toml | cut -d' ' -f1)
STAMP      := $(VENV)/.installed-dev-$(DEPS)
SERVE_STAMP := $(VENV)/.installed-server-$(DEPS)

.PHONY: serve test test-deploy venv serve-venv kserve-venv system-deps protos lint typecheck docs bench train stack clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@ $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[server]'
	rm -f $(VENV)/.installed-server-*
	touch $@

venv: $(STAMP)
serve-venv: $(SERVE_STAMP)

# KServe's own clients for tests/e2e/test_kserve_clients.py, in a venv of their own (their pins clash with
# tritonclient's); rebuilt when the pin file changes.
KSERVE_STAMP := .venv-kserve/.installed-$(shell cksum scripts/kserve-requirements.txt | cut -d' ' -f1)
$(KSERVE_STAMP): scripts/kserve-requirements.txt
	test -x .venv-kserve/bin/python || $(PYTHON) -m venv .venv-kserve
	.venv-kserve/bin/python -m pip install -q -r scripts/kserve-requirements.txt
	rm -f .venv-kserve/.installed-*
	touch $@

kserve-venv: $(KSERVE_STAMP)

serve: serve-venv
	$(BIN)/convserve serve

system-deps:
	bash scripts/install_system_deps.sh

# Last step: the SDK tests again in a venv holding the LOWEST grpcio/protobuf/numpy/health-checking declared.
test: venv kserve-venv system-deps
	$(BIN)/ruff check .
	$(MAKE) typecheck
	$(MAKE) docs
	$(BIN)/python -m pytest
	$(BIN)/python scripts/check_dependency_floor.py
	$(MAKE) test-deploy

# The cpu image and the compose stack built and run for real (tests/deploy/live): starts a private Docker
# engine when none runs, builds base images from Debian packages when no registry answers, cleans up
# everything it made. Needs root. See scripts/test_deploy.sh.
test-deploy: venv
	bash scripts/test_deploy.sh

protos: venv
	$(BIN)/python scripts/gen_protos.py

lint: venv
	$(BIN)/ruff check .
	$(MAKE) typecheck

# mypy over server, client, common and cli (pyproject.toml [tool.mypy]).
typecheck: venv
	$(BIN)/mypy

# The docs site (mkdocs.yml, pages under docs/), strict: a broken link or anchor fails the build.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

# Reproduce the bundled digits model (scikit-learn's digits + printed digits from the training fonts, exported
# to model_repository/) and its dense baseline for `convserve robustness` (exported to runs/baselines/).
# One thread: reproducible weights on any machine, and no slowdown when other jobs share the cores.
train: venv system-deps
	$(BIN)/convserve train --arch lenet --data digits-synth --seed 0 --threads 1 --no-progress --out runs/digits_lenet
	$(BIN)/convserve export --checkpoint runs/digits_lenet/checkpoint.pt --name digits_lenet --version 1 --repository model_repository --force
	# The int8 version 2 is written only where it passes the accuracy gate and is faster (exit 3: refused, which is
	# the outcome on AVX2-only CPUs, where the LeNet runs slower in int8; the table says why).
	$(BIN)/convserve quantize model_repository/digits_lenet --from-version 1 || [ $$? -eq 3 ]
	$(BIN)/convserve train --arch mlp --data digits-synth --seed 0 --threads 1 --no-progress --out runs/digits_mlp
	$(BIN)/convserve export --checkpoint runs/digits_mlp/checkpoint.pt --name digits_mlp --version 1 --repository runs/baselines --force

bench: venv
	$(BIN)/python -m benchmarks.run

# The compose stack as local processes (2 replicas + nginx + Prometheus on 127.0.0.1), for machines without Docker.
stack: venv system-deps
	$(BIN)/python scripts/run_stack.py

clean:
	rm -rf $(VENV) .venv-protoc .venv-floor .venv-kserve .pytest_cache .ruff_cache .hypothesis runs bench_results
