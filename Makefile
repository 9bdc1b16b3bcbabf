VENV ?= .venv
PY := $(VENV)/bin/python
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.PHONY: install test demo bench bench-download bench-shard bench-e2e lint clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/curate demo --output demo-out

bench: install
	$(PY) -m bench.run

bench-download bench-shard bench-e2e: install
	$(PY) -m bench.run --only $(@:bench-%=%)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy curate/

clean:
	rm -rf demo-out .pytest_cache
