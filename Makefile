# Two commands for a new user: `make demo` and `make test`. Both set up .venv first if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.reidbuild-installed

.PHONY: demo test pycaffe browser report-screenshot bench zoo-table clean-outputs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the exact CPU wheel first, so nothing below can pull a CUDA build of torch
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# fast-reid's own code, the reference the tests compare against (and `source.model_code: installed`).
	# --no-deps: its metadata pins torch 1.13.1 and torchvision; the parts used here (config, modeling,
	# Checkpointer, solver) need only yacs and termcolor, installed by the test extras above
	$(BIN)/python -m pip install --quiet --no-deps fastreid==1.4.0
	touch $(STAMP)

# apply prints the HTML report's path last (outputs/demo/demo.report.html)
demo: $(STAMP)
	$(BIN)/reidbuild apply manifests/demo.yml

# a PNG of the demo's report, made in headless Chromium (not kept in git)
report-screenshot: demo browser
	$(BIN)/python scripts/report_screenshot.py outputs/demo/demo.report.html outputs/demo/demo.report.png

# every test, Caffe parity on a real pycaffe included (built once, then cached), the report in a real Chromium
test: $(STAMP) pycaffe browser
	$(BIN)/python -m pytest -q

# a real CPU pycaffe (about 5 CPU-minutes the first time; cached outside the checkout afterwards, so fresh
# clones on the same machine, like CI's, reuse it)
PYCAFFE_PREFIX ?= $(HOME)/.cache/reidbuild/pycaffe
pycaffe: $(STAMP)
	bash scripts/build_pycaffe.sh $(abspath $(BIN)/python) $(PYCAFFE_PREFIX)

# every model config fast-reid ships through `reidbuild apply` (tests/zoo: 43 builds, many minutes on 2 cores), then
# the results as the README's table; a failing config is a row of the table, so the table is written either way
zoo-table: $(STAMP) pycaffe
	rm -rf outputs/zoo
	-REIDBUILD_ZOO_RESULTS=outputs/zoo $(BIN)/python -m pytest -q tests/zoo
	$(BIN)/python scripts/zoo_table.py outputs/zoo README.md

# Debian's chromium for the report's browser tests (headless; needs root or sudo the first time)
browser:
	command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi; }

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/bench_memory.py --only r101

clean-outputs:
	rm -rf outputs
