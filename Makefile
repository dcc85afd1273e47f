# The verbs a newcomer needs. Everything runs from the project's own .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
NOT_COMPILED := torch/testing/_internal/py312_intrinsics\.py$$|/tests/|/site-packages/pip/|transformers/models/(?!__init__|auto/|bert/|align/|encoder_decoder/)
STAMP := $(VENV)/.installed-$(shell cat requirements.lock 2>/dev/null | cksum | cut -d' ' -f1)

ONNX ?=
NAME ?= model
PORT ?= 18111
REGISTRY ?= var/registry

.PHONY: setup up up-scaled demo demo-scaled loadtest test proto proto-check serve-onnx bench bench-serving bench-loop bench-delivery bench-scaled eval-fraud eval-recommender eval-pricing fuzz report peers lock clean

setup: $(STAMP)

# Pinned, exact, no resolver surprises: the lock lists every package.
$(STAMP): requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-compile -r requirements.lock
	@# the bytecode pip would write, on every core (pip compiles on one: ~40 of its ~65 s here), for
	@# what can be imported: not the packages' own test suites, pip, nor transformers' model families
	@# but the text encoder's (BERT; a whole `make test` imports nothing else there): 6,300 of the
	@# 16,200 files, 49 -> 29 CPU-s. Left out too: torch's test helper in 3.12 syntax (pip skips it).
	$(PY) -m compileall -q -j 0 -x '$(NOT_COMPILED)' $(VENV)/lib
	rm -f $(VENV)/.installed-*
	touch $@

# The whole suite in the foreground: trainer (bootstraps from real data) + every service.
up: setup
	$(PY) -m ops.up

# Every process twice on one machine, sharing state on Redis (python -m ops.up --help): a redis-server
# (var/redis), two trainers (one learns each domain, the other stands by), two replicas of each service.
up-scaled: setup
	$(PY) -m ops.up --replicas 2 --redis

# The suite plus two minutes of real-data traffic and outcomes: new versions published and picked up
# (a minute was too short on 2 busy cores for the recommender's calibrated version to serve).
demo: setup
	$(PY) -m ops.up --demo 120

# make demo on make up-scaled: the traffic spreads over each service's replicas (round_robin).
demo-scaled: setup
	$(PY) -m ops.up --demo 120 --replicas 2 --redis

# Load test a running suite (see python -m ops.loadtest --help for scenarios and modes).
loadtest: setup
	$(PY) -m ops.loadtest fraud --target 127.0.0.1:50051 -c 32 -d 30
	$(PY) -m ops.loadtest fraud --target 127.0.0.1:50051 --rate 300 -d 30
	$(PY) -m ops.loadtest recommend --target 127.0.0.1:50052 -c 32 -d 30
	$(PY) -m ops.loadtest quote --target 127.0.0.1:50053 -c 32 -d 30

# Three xdist workers: most tests wait on real servers and subprocesses, so three keep a 2-core
# machine busy; long tests go first (tests/conftest.py) and the rest to whichever worker is free.
# First versions are trained once per session.
TEST_WORKERS ?= 3
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load

proto: setup
	$(PY) -m protos.codegen

proto-check: setup
	$(PY) -m protos.codegen --check

# Serve one ONNX file over KServe V2 in the foreground; without ONNX=, follow the registry.
serve-onnx: setup
	@if [ -n "$(ONNX)" ]; then \
	  exec $(PY) -m shared.serve_onnx --onnx "$(ONNX)" --name "$(NAME)" --port "$(PORT)"; \
	else \
	  exec $(PY) -m shared.serve_onnx --registry-dir "$(REGISTRY)" --name "$(NAME)" --port "$(PORT)"; \
	fi

# Serving, hot swap, ingest, freshness, domain serving, recommender evaluation, safe delivery (scaled
# down, ~10 minutes of the total) -> docs/BENCHMARKS.md.
bench: setup
	$(PY) -m bench.suite

bench-serving: setup
	$(PY) -m bench.suite serving

bench-loop: setup
	$(PY) -m bench.suite loop

# Redis mode (issue 14): ingest into Redis Streams, one vs two fraud replicas, freshness with replicas
# (bench/results/scaled.json; 4-10 minutes on 2 cores).
bench-scaled: setup
	$(PY) -m bench.suite scaled

# Gate, canary, drift recovery, bytes per event / version, disk under retention (bench/results/delivery.json;
# also bench/results/drift.json). Part of `make bench`, at the scaled-down default it prints (~10 minutes on
# 2 cores); `$(PY) -m bench.delivery --full` runs the whole creditcard stream (about an hour).
bench-delivery: setup
	$(PY) -m bench.suite delivery

# Prequential fraud evaluation: incremental loop vs full retrain vs River (bench/results/fraud.json).
eval-fraud: setup
	$(PY) -m bench.suite eval-fraud

# Prequential recommender evaluation on Ta Feng (bench/results/recommender.json).
eval-recommender: setup
	$(PY) -m bench.suite eval-recommender

# Market simulation against the best fixed price (bench/results/pricing.json).
eval-pricing: setup
	$(PY) -m bench.suite eval-pricing

# >= 3,000 hostile requests per service against the whole suite (bench/results/fuzz.json).
fuzz: setup
	$(PY) -m bench.suite fuzz

# Render each domain's learning report now (the trainer refreshes them while it runs).
report: setup
	$(PY) -m trainer report

# Side-by-side with PyTriton and MLServer (../shared/peers), both benchmark models.
peers: setup
	../shared/peers/run.sh -d 10 -c 1,32 --only baseline,pytriton,mlserver-pw0,ours \
	  --ours-cmd "make -C $(CURDIR) serve-onnx ONNX={model} NAME=mlp PORT={port}"
	../shared/peers/run.sh -d 10 -c 1,32 --model twotower --only baseline,pytriton,mlserver-pw0,ours \
	  --ours-cmd "make -C $(CURDIR) serve-onnx ONNX={model} NAME={name} PORT={port}"

lock: setup
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache var
