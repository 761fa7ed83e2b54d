# Entry points: `make demo` and `make test` create (or reuse) .venv and install the package first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.beyond-cls-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: the C++ extension builds against it (--no-build-isolation).
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install "setuptools>=64" wheel ninja pybind11 "torch>=2.4" "torchvision>=0.19"
	$(BIN)/python -m pip install --no-build-isolation -e ".[dev]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/beyond-cls demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

# CPU kernel benchmarks, side by side; the table lands in benchmarks/results/ (GPU: benchmarks/device.sh)
bench: install
	mkdir -p build
	for op in attention abmilp loader; do \
		$(BIN)/python -m pytest benchmarks/bench_$$op.py -p no:cacheprovider -m "not gpu" \
			--benchmark-save-data --benchmark-json build/bench_$${op}_cpu.json && \
		$(BIN)/python benchmarks/report.py build/bench_$${op}_cpu.json benchmarks/results/$${op}_cpu || exit 1; \
	done

clean:
	rm -rf build dist *.egg-info beyond_cls/_C*.so $(STAMP)
