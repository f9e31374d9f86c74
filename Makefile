# Two targets a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck bench corpus sysdeps clean

$(BIN)/slotline: pyproject.toml setup.py
	sh packaging/dev/bootstrap-venv.sh $(PYTHON) $(VENV)
	@touch $@

sysdeps:
	@sh packaging/dev/system-deps.sh

demo: $(BIN)/slotline
	$(BIN)/slotline demo

test: $(BIN)/slotline sysdeps
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(BIN)/slotline
	$(BIN)/ruff check .
	$(BIN)/mypy agent controller firmware_bundles simulator slotline_cli.py

corpus:
	sh ../shared/corpus/fetch.sh .corpus-cache

bench: $(BIN)/slotline corpus
	$(BIN)/pip install -q -e '.[test,bench]'
	command -v xdelta3 >/dev/null && command -v bsdiff >/dev/null || apt-get install -y -qq xdelta3 bsdiff
	$(BIN)/python -m bench.delta_bench --synthetic-gib 1 --timeout 150
	$(BIN)/python bench/verify_speed.py --size-mib 1024 --runs 3
	$(BIN)/python bench/agent_footprint.py --size-mib 1024
	$(BIN)/python -m bench.transport_loopback --chunks 100 serving
	$(BIN)/python -m bench.transport_loopback resume
	$(BIN)/python -m bench.transport_loopback flood
	$(BIN)/python -m bench.transport_throttle
	$(BIN)/python -m bench.transport_relay
	$(BIN)/python -m bench.controller_rollout --devices 10000 --db sqlite
	$(BIN)/python -m bench.controller_rollout --devices 10000 --db postgres
	$(BIN)/python -m bench.sim_scale

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
