"""Applications: the `lllm` command, the book driver, the prompt sweep and the figures the notebooks draw."""
