# The two commands of the README: `make run` (set up, then the main job) and `make test`.
PY := .venv/bin/python
DATA ?=
# more flags of `scripts/stack.py up` for `make run`, e.g. STACK_ARGS='--gateway-http-port 8081'
STACK_ARGS ?=
# pytest's worker processes: each takes whole test modules (--dist loadfile), so a module's fixtures stay in one
# process; TEST_WORKERS=0 runs the suite in this one
TEST_WORKERS ?= 2
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup run stop loadtest bench test clean
setup:
	bash scripts/setup.sh

run: setup
	$(PY) scripts/stack.py up $(if $(DATA),--data "$(DATA)",) $(STACK_ARGS)

stop:
	$(PY) scripts/stack.py down

loadtest:
	$(PY) -m loadtests.run

bench: setup
	$(PY) -m bench.run_all

test: setup
	$(PY) -m training_job weights  # every base the tests use (setup converts the default's only)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf var .pytest_cache
