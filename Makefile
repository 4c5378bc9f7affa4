.PHONY: setup test test-fast book

# Create .venv and install lllm with all extras and the model weights; safe to repeat.
setup:
	bash .ci/run setup

# Every tier: tests/unit, tests/integration (the embedded weights), tests/e2e (notebooks, book, browser,
# subprocesses, Dask). What CI runs.
test:
	OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest -q

# The unit tier only (tiny random configs), for the inner loop.
test-fast:
	OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest -q tests/unit

book:
	.venv/bin/lllm book
