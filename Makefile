# The two commands of the README: `make demo` (the whole job) and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: setup system-deps demo page serve stop test test-fast bench long-tail shoppers learn lint clean

setup:
	./scripts/setup.sh

system-deps:
	./scripts/system-deps.sh

demo: setup
	./scripts/demo.sh

page: setup
	./scripts/page.sh

# Milvus standalone + Triton left running on loopback, shared by the page, search, sync and upgrades.
serve: setup
	./scripts/serve.sh

stop:
	./scripts/serve.sh stop

test: setup system-deps
	$(PY) -m pytest

# The unit tier (tests marked `unit`): no server, no trained model, under a minute; `make test` runs it too.
test-fast: setup
	$(PY) -m pytest -m unit

# Serving benchmarks on what `make demo` built (about 45 minutes here; bench/service.py also needs the index
# `make serve` made once, and no served Milvus running: `make stop`); results in bench/results/.
bench: setup system-deps
	$(PY) bench/serving.py --checkpoint runs/mm3-concat --model-repository model_repository
	$(PY) bench/perf.py --model-repository model_repository
	$(PY) bench/milvus_search.py --milvus-uri runs/milvus.db --model-repository model_repository
	$(PY) bench/hybrid.py --milvus-uri runs/milvus.db
	$(PY) bench/service.py

# The long tail (bench/results/long_tail.md, probe.md): the demo's recipe and the look-pairs recipe trained on the
# full catalog (runs/tail/, resumable; about 25 minutes each here), the supervised probe (20 minutes by the clock),
# then one table with the untrained baseline, in process.
TAIL_PAIRS := --look-pairs --attribute-logit-adjust 1.0 --attribute-scale
long-tail: setup
	$(PY) -m training.train --out runs/tail/mm3-concat
	$(PY) -m training.train --out runs/tail/pairs-la $(TAIL_PAIRS)
	$(PY) bench/probe.py --minutes 20
	$(PY) bench/long_tail.py --checkpoint "mm3-concat, 1 epoch (make demo)=runs/tail/mm3-concat" \
		--checkpoint "+ look pairs, adjusted and scaled heads=runs/tail/pairs-la" --untrained mm3-concat

# Shopper events on the shared deployment (`make serve` first): SIMULATED shoppers through a page of their own and
# the click model's recovery of their position bias (bench/results/shoppers.*), then what logging costs search
# latency (bench/results/event_logging.*).
shoppers: setup
	$(PY) bench/shoppers.py
	$(PY) bench/event_logging.py

# The learning loop on the shared deployment (`make serve` first): SIMULATED shoppers, judgments, a query tower
# trained from them, offline and interleaved evaluation, then the gate promotes it or refuses (runs/learning/).
learn: setup
	$(PY) -m client.learning_loop

lint: setup
	.venv/bin/ruff check .

clean:
	rm -rf runs cache build .pytest_cache
