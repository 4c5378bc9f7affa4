"""Analyses built on the kernel: decompositions, the per-prompt pipeline, generation and steering."""
