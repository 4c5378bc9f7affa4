"""The tiny random models the tests use live in lllm.apps.zoo (the supported-architectures page runs them too)."""

from lllm.apps.zoo import (  # noqa: F401
    ARCHITECTURES, COMMON, FAMILY_CONFIGS, IdsTokenizer, check_architecture, lm_head_reads, randomize,
    tiny_architecture, tiny_model,
)

# The forward sweep replays one recorded forward on a batch of basis vectors; these select rows by x-dependent
# indices (MoE routing) or flatten the batch into the token axis (OPT) or reshape frozen scores with the batch
# (Falcon's and Bloom's ALiBi): method="auto" takes reverse mode there, method="forward" is refused.
NO_BATCHED_REPLAY = {"mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "opt", "falcon_alibi", "bloom"}
