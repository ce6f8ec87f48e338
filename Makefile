# lamina-llm-cache: every target installs what it needs first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
MANIFEST ?= models.yaml
MOUNTPOINT ?= models

.PHONY: install test mount demo bench bench-smoke clean

install: $(STAMP)

$(STAMP): pyproject.toml
	./contrib/install-system-deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

mount: install
	$(VENV)/bin/lamina-llm-cache mount $(MOUNTPOINT) -m $(MANIFEST)

demo: install
	$(VENV)/bin/lamina-llm-cache demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
