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
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
