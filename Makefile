VENV ?= .venv
PY := $(VENV)/bin/python
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.PHONY: install test test-cluster demo bench bench-download bench-shard bench-e2e bench-spark bench-dedup bench-score bench-scale bench-reshard bench-books bench-global lint clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# The Spark standalone cluster alone (also part of `make test`): a Master and two Workers on 127.0.0.1, one killed.
test-cluster: install
	$(PY) -m pytest -q tests/executors/test_spark_cluster.py

demo: install
	$(VENV)/bin/curate demo --output demo-out

bench: install
	$(PY) -m bench.run

bench-download bench-shard bench-e2e: install
	$(PY) -m bench.run --only $(@:bench-%=%)

# Full size (make bench runs these smaller, without writing): Spark vs local on 2,000 rows, 3 rounds (~6 min);
# semantic dedup at N = 100k, then N = 1M (the 1M run writes last, so latest.json's dedup_* figures are 1M's).
bench-spark: install
	$(PY) -m bench.bench_spark

# The recipe's models at full size, 300 s of timed rounds (~6.5 min); make bench runs a 60 s version.
bench-score: install
	$(PY) -m bench.bench_score

# Issue 18: the score stage on one GPU (nvJPEG + bf16 vs the PIL path and a clip-retrieval-style reference), < 5 min
# on an H100; needs open_clip there (bench/bench_gpu.py's docstring has the device-tool command). gpu_* figures.
bench-gpu:
	$(PY) -m bench.bench_gpu

# Issue 13: both engines on LAION-size files, 1,000 live rows each; local at 1M and 10M rows, Spark at 100k and 1M
# (--sizes, --spark-sizes, --no-spark). bench/work: ~1 GB of images, ~0.55 GB of corpora and an output per size.
# Curate img2dataset-format tars (2,000 photos) vs the hand-rolled webdataset decode + TarWriter script (issue 14).
bench-reshard: install
	$(PY) -m bench.bench_reshard

bench-scale: install
	$(PY) -m bench.bench_scale

bench-books: install
	$(PY) -m bench.bench_books

# Issue 27: the global steps alone (pHash, url+caption, semantic) at 10^6 / 10^7 (pHash and url also 10^8) with
# each child's peak RSS; --phash-sizes, --url-sizes, --semantic-sizes, --recall-n pick less.
bench-global: install
	$(PY) -m bench.bench_global

bench-dedup: install
	$(PY) -m bench.bench_dedup --n 100000
	$(PY) -m bench.bench_dedup

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy curate/

clean:
	rm -rf demo-out .pytest_cache
