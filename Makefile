# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0

.PHONY: demo test lint format bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	touch $@

# An editable install skips pyproject's data-files: copy the Voila template (no CDN) ourselves.
VOILA_TEMPLATE := share/jupyter/voila/templates/qviz-offline

$(VENV)/.installed: $(VENV)/.base pyproject.toml $(VOILA_TEMPLATE)/*
	$(PY) -m pip install -q $(TORCH) -e .
	mkdir -p $(VENV)/$(VOILA_TEMPLATE) && cp $(VOILA_TEMPLATE)/* $(VENV)/$(VOILA_TEMPLATE)/
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml $(VOILA_TEMPLATE)/*
	$(PY) -m pip install -q $(TORCH) -e '.[dev]'
	mkdir -p $(VENV)/$(VOILA_TEMPLATE) && cp $(VOILA_TEMPLATE)/* $(VENV)/$(VOILA_TEMPLATE)/
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m qviz.cli fetch
	$(PY) -m qviz.cli diagnose --bits 2,3,4,8
	$(PY) -m qviz.cli serve --model smollm2-135m

# Debian's chromium drives the browser tests (Playwright's own download does not work offline);
# without it (no root, no apt) the browser tests skip and say why.
$(VENV)/.chromium: $(VENV)/.base
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium) \
		|| echo "chromium could not be installed: browser tests will skip"
	touch $@

test: $(VENV)/.dev $(VENV)/.chromium
	$(VENV)/bin/ruff check qviz tests bench
	$(VENV)/bin/ruff format --check qviz tests bench
	$(PY) -m qviz.cli fetch --all
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax notebooks

bench: $(VENV)/.installed
	$(PY) -m qviz.cli bench quant

lint format:
	$(VENV)/bin/ruff format qviz tests bench
	$(VENV)/bin/ruff check --fix qviz tests bench

clean:
	rm -rf $(VENV) build *.egg-info
