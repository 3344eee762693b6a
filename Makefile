# The two commands of the README. Both create .venv on first use.
.PHONY: demo test

demo:
	@bash scripts/setup_env.sh run
	.venv/bin/mxfp4-rl demo

test:
	@bash scripts/setup_env.sh test
	.venv/bin/python -m pytest
