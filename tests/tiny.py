"""The tiny random models the tests use live in lllm.zoo (the supported-architectures page runs them too)."""

from lllm.zoo import (  # noqa: F401
    ARCHITECTURES, COMMON, FAMILY_CONFIGS, IdsTokenizer, check_architecture, lm_head_reads, randomize,
    tiny_architecture, tiny_model,
)
