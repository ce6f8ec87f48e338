# lamina-llm-cache: every target installs what it needs first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
MANIFEST ?= models.yaml
MOUNTPOINT ?= models
# yes: pyfuse3 with FUSE passthrough (contrib/build-passthrough.sh); no: the stock pyfuse3
PASSTHROUGH ?= yes

.PHONY: install test-tools typecheck test mount demo bench bench-smoke bench-scale bench-passthrough clean

install: $(STAMP)

$(STAMP): pyproject.toml contrib/build-passthrough.sh contrib/pyfuse3-passthrough.patch
	./contrib/install-system-deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	if [ "$(PASSTHROUGH)" = yes ]; then ./contrib/build-passthrough.sh $(VENV); fi
	touch $(STAMP)

# What the tests compare against (test_bench_smoke runs the benchmark harness): fio, rclone, curl.
test-tools:
	./bench/install-deps.sh

# mypy over vfs/, configured in pyproject.toml ([tool.mypy]); its cache makes a rerun take seconds.
typecheck: install
	$(PY) -m mypy

# The container tests start their own Docker engine; they need these (root installs them).
test: install test-tools typecheck
	./contrib/install-system-deps.sh dockerd=docker.io debootstrap docker-compose || true
	$(PY) -m pytest -q

mount: install
	$(VENV)/bin/lamina-llm-cache mount $(MOUNTPOINT) -m $(MANIFEST)

demo: install
	$(VENV)/bin/lamina-llm-cache demo

# Benchmarks against curl, hf_hub_download, rclone and local disk: writes docs/BENCHMARKS.md
# and docs/benchmarks.png. Needs root (drops the page cache, mounts).
bench: install
	./bench/install-deps.sh
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m bench --out docs

# Start-up and big trees at fleet scale (1,000 models over 10 repos; a 100,000-file repo;
# the simulator 50 ms away): writes the Scale section of docs/BENCHMARKS.md. Needs root.
bench-scale: install
	$(PY) -m bench.scale --out docs

# FUSE passthrough and the daemon's path against local copies, side by side (about 10
# minutes): writes the Passthrough section of docs/BENCHMARKS.md. Needs root.
bench-passthrough: install
	./bench/install-deps.sh
	$(PY) -m bench.passthrough --out docs

# The same harness on a small file with one repeat: checks it works, measures nothing.
bench-smoke: install test-tools
	$(PY) -m bench --smoke --out build/bench-smoke

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
