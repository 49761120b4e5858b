# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install fdino with pip under constraints.txt (torch 2.14.1, torchvision 0.29.1, triton 3.8.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fdino-installed
# mlflow and wandb too, so their tracker tests run instead of skipping.
EXTRAS ?= test,export,serve,mlflow,wandb,app

.PHONY: setup demo lint test test-system-deps bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

setup: $(STAMP)

# The main job on the built-in data set, its schedule fitted to 5 minutes on this machine (--budget).
demo: $(STAMP)
	$(VENV)/bin/fdino train --preset small32_resnet --data shapes10 --run-dir runs/demo --overwrite --eval-every 338 --budget 5m

# System packages some tests use: Debian's Fashion-MNIST (real data for the evaluation tests) and
# Chromium + ChromeDriver (the search page in a real browser). Installed only where apt and root
# exist; the tests that need them skip with the reason when they are missing.
SYSTEM_PACKAGES := dataset-fashion-mnist chromium chromium-driver
test-system-deps:
	@missing=""; \
	[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing system packages:$$missing"; \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null)) \
		|| echo "note: could not install$$missing; the tests that need them will skip"; \
	fi

# Lint and format check (ruff, configured in pyproject.toml) before the tests: CI fails on either.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) test-system-deps lint
	$(PY) -m pytest -q

# The same suite on the GPU machines' versions (torch 2.11.0, torchvision 0.26.0, triton 3.6.0) in a
# second venv, pinned by constraints-torch211.txt; installed like $(STAMP) (about 5 GB, minutes).
VENV_TORCH211 ?= .venv-torch211
PY_TORCH211 := $(VENV_TORCH211)/bin/python
STAMP_TORCH211 := $(VENV_TORCH211)/.fdino-installed

$(STAMP_TORCH211): pyproject.toml constraints-torch211.txt
	@test -x $(PY_TORCH211) || $(PYTHON) -m venv $(VENV_TORCH211)
	$(PY_TORCH211) -m pip install -q -c constraints-torch211.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP_TORCH211)

.PHONY: test-torch211
test-torch211: $(STAMP_TORCH211) test-system-deps
	$(PY_TORCH211) -m pytest -q

# GPU benchmarks (skip cleanly without CUDA); results land in bench/results/.
bench: $(STAMP)
	$(PY) -m pytest -q bench

clean:
	rm -rf $(VENV) $(VENV_TORCH211) .pytest_cache .hypothesis runs
