# The two commands a new user needs: `make run` serves, `make test` proves it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench man unasync clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	@# atheris (coverage-guided fuzzing) only where a wheel exists; its test skips elsewhere
	$(PY) -m pip install --quiet --only-binary=:all: 'atheris>=2.3' \
		|| echo "atheris: no wheel for this platform; the atheris fuzz test will be skipped"
	@# the man page where `man stigmer-broker` finds it (a pip install puts it there itself;
	@# an editable one does not): a link, so `make man` keeps it current
	mkdir -p $(VENV)/share/man/man1
	ln -sfn $(CURDIR)/broker/cli/stigmer-broker.1 $(VENV)/share/man/man1/stigmer-broker.1
	touch $(STAMP)

## run: serve in the foreground on the default paths (Ctrl-C stops it)
run: $(STAMP)
	$(VENV)/bin/stigmer-broker serve

## test: install with test extras, lint, then the whole test suite
test: $(STAMP) lint
	$(PY) -m pytest -q -n auto

## lint: ruff and mypy --strict over the sources, tests and benchmarks
lint: $(STAMP)
	@mkdir -p .typecheck/stigmer
	@ln -sfn ../../broker .typecheck/stigmer/broker
	@ln -sfn ../../client .typecheck/stigmer/client
	$(VENV)/bin/ruff check broker client tests scripts $(wildcard bench/*.py)
	$(PY) scripts/unasync_client.py --check
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p stigmer.broker -p stigmer.client
	$(VENV)/bin/mypy tests scripts $(wildcard bench/*.py)

## man: regenerate the man page from the argparse definitions
man: $(STAMP)
	$(PY) scripts/make_manpage.py

## unasync: regenerate the blocking client from the async one
unasync: $(STAMP)
	$(PY) scripts/unasync_client.py

## bench: fetch and CLI benchmarks against same-run baselines (bench/results.json)
bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .typecheck .mypy_cache .pytest_cache .ruff_cache
