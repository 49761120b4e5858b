# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install fdino with pip under constraints.txt (torch 2.14.1, torchvision 0.29.1, triton 3.8.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fdino-installed
EXTRAS ?= test

.PHONY: setup demo test test-data bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23.1"
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

setup: $(STAMP)

# The main job on the built-in data set (about 5 minutes on 2 CPU cores).
demo: $(STAMP)
	$(VENV)/bin/fdino train --preset small32 --data shapes10 --run-dir runs/demo --overwrite

# Real data for the evaluation tests: Debian's Fashion-MNIST package (only where apt and root exist;
# the tests that need it say so when it is missing).
test-data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
		|| echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	fi

test: $(STAMP) test-data
	$(PY) -m pytest -q

# GPU benchmarks (skip cleanly without CUDA); results land in bench/results/.
bench: $(STAMP)
	$(PY) -m pytest -q bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs
