# The two commands of the README: `make run` (set up, then the main job) and `make test`.
PY := .venv/bin/python
DATA ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup run test clean
setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m training_job run $(if $(DATA),--data $(DATA),)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf var .pytest_cache
