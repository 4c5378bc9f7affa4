"""The kernel: the op-level linearization, the Jacobian engines, the layer readouts and the matrix-free operator."""
