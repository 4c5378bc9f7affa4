.PHONY: setup test book

# Create .venv and install lllm with all extras and the model weights; safe to repeat.
setup:
	bash .ci/run setup

test:
	OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest -q

book:
	.venv/bin/lllm book
