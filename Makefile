# Two entry points: `make demo` runs the offline LoRA demo, `make test` runs the test suite.
# Each creates .venv if needed and installs torch first (TORCH; from PyPI on Linux that is the CUDA build, for the
# CPU wheel: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"), then litft
# and its test extras.
PY := .venv/bin/python
TORCH ?= torch==2.13.0

.venv/installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) scripts/fetch_offline_assets.py
	touch $@

install: .venv/installed

test: install
	$(PY) -m pytest tests -n auto --dist loadfile

demo: install
	$(PY) scripts/demo.py

.PHONY: install test demo
