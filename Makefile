# Two commands set everything up on a fresh machine:
#   make demo   synth -> train -> export -> inspect on the embedded synthetic dataset
#   make test   the whole test suite, slow tests included (CI runs exactly this)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= train,cpu,elpv,pretrained,search,dev
# Extra pip arguments for the torch install only, e.g. on plain PyPI (where the Linux wheel is the CUDA
# build): make test TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
TORCH_PIP_ARGS ?=

.PHONY: install browser test demo lint clean

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

test: install browser
	$(PY) -m pytest

demo: install
	$(VENV)/bin/defectscope demo

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean:
	rm -rf outputs multirun mlruns mlflow.db demo
