# Two commands set everything up on a fresh machine:
#   make demo   synth -> train -> export -> inspect on the embedded synthetic dataset
#   make test   the wheel check, then the whole test suite, slow tests included (CI runs exactly this)
#   make test-fast   everything except the slow tests (the edit-test loop)
#   make wheel-check   build the wheel, install it into a fresh virtualenv, train + export outside the checkout
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= train,cpu,elpv,pretrained,search,dev
# Extra pip arguments for the torch install only, e.g. on plain PyPI (where the Linux wheel is the CUDA
# build): make test TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
TORCH_PIP_ARGS ?=
# Test files run in this many processes (pytest-xdist), each file whole in one of them, so a file's trained
# fixtures are built once. Much of the suite waits on subprocesses, servers and disk: two processes on two
# cores finish it sooner than one. TEST_WORKERS=0 runs it in this process (for a debugger). Tests marked
# idle measure the machine's load, so they run afterwards, alone.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile

.PHONY: install browser test test-fast wheel-check demo lint clean

# torch==2.13.0 first: that CPU wheel satisfies the project's torch>=2.4 range, so pip pulls no CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# The HTML report test renders in a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The wheel check runs first, so the closing lines are pytest's summary.
test: install browser wheel-check
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not idle"
	$(PY) -m pytest -m idle

test-fast: install
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not slow"

# A plain (non-editable) install trains: the configs must ship inside the wheel.
wheel-check: install
	.ci/wheel_check.sh $(PY) $(TORCH_PIP_ARGS)

demo: install
	$(VENV)/bin/defectscope demo

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean:
	rm -rf outputs multirun mlruns mlflow.db demo
