# The two commands of the README. Both create .venv on first use.
.PHONY: demo test

demo:
	@bash scripts/setup_env.sh run
	.venv/bin/mxfp4-rl demo

# Two workers, one test file to each at a time (a file's engine fixtures stay in one process), in the order
# tests/conftest.py gives: the whole suite took 14.3 minutes on 2 cores against 21 serially. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2

test:
	@bash scripts/setup_env.sh test
	.venv/bin/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
