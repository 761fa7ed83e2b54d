# Entry points: `make demo` and `make test` create (or reuse) .venv and install the package first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.beyond-cls-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)

.PHONY: install demo test lint bench kernel-report clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: the C++ extension builds against it (--no-build-isolation).
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install "setuptools>=64" wheel ninja pybind11 "torch>=2.4" "torchvision>=0.19"
	$(BIN)/python -m pip install --no-build-isolation -e ".[dev,hf]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/beyond-cls demo

# aarch64 cross compiler for tests/test_cross_compile.py (GH200 nodes are aarch64): installed as root with apt,
# else that test says it cannot run
cross-compiler:
	@command -v aarch64-linux-gnu-g++ >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		g++-aarch64-linux-gnu >/dev/null 2>&1; } || echo "note: no aarch64-linux-gnu-g++; the aarch64 compile test is skipped"

# one pytest-xdist worker per core (at most 8); each test module stays on one worker (its fixtures are made once)
test: install cross-compiler
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n auto --maxprocesses 8 --dist loadscope

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

# Static report of the Triton kernels as an sm_90 GPU would run them (no GPU needed): registers, spills, shared
# memory, SASS per element of the main loop, AbMILP bytes per call -> benchmarks/results/static_sm90.{csv,md}
kernel-report: install
	nice $(BIN)/python benchmarks/kernel_report.py

clean:
	rm -rf build dist *.egg-info beyond_cls/_C*.so $(STAMP)
