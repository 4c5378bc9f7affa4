"""The tiny random models the tests use live in lllm.apps.zoo (the supported-architectures page runs them too).

This module also holds the `lllm sweep` loaders of tiny models: a loader is named "module:function" and imported
by name in Dask workers and CLI subprocesses, which reach tests/ on their path but not the test modules.
"""

import os
import random
import time

import torch

from lllm.apps import zoo
from lllm.apps.zoo import (  # noqa: F401
    ARCHITECTURES, COMMON, FAMILY_CONFIGS, IdsTokenizer, check_architecture, lm_head_reads, randomize,
    tiny_architecture,
)

# Where tiny_model puts its models: "cpu", or "cuda" for benchmarks/gpu_check.sh, which runs the family tests there.
DEVICE = torch.device(os.environ.get("LLLM_TEST_DEVICE", "cpu"))


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """lllm.apps.zoo.tiny_model on the test device (LLLM_TEST_DEVICE, default cpu)."""
    return zoo.tiny_model(family, dtype, seed, **overrides).to(DEVICE)

# The forward sweep replays one recorded forward on a batch of basis vectors; these select rows by x-dependent
# indices (MoE routing) or flatten the batch into the token axis (OPT) or reshape frozen scores with the batch
# (Falcon's and Bloom's ALiBi): method="auto" takes reverse mode there, method="forward" is refused.
NO_BATCHED_REPLAY = {"mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "opt", "falcon_alibi", "bloom"}


# ---------------------------------------------------------------------------------------------
# Sweeps of tiny models (tests/unit/test_sweep.py, tests/e2e/test_sweep.py)
# ---------------------------------------------------------------------------------------------

SWEEP_MODEL = "tiny:llama"
SWEEP_LOADER = "tiny:tiny_loader"


def tiny_loader(name: str, dtype):
    """(model, tokenizer) for "tiny:<family>" or "tiny-<family>": seeded, so every process builds the same weights."""
    family = name.split(":", 1)[1] if ":" in name else name.removeprefix("tiny-")
    return tiny_model(family, dtype, seed=0), IdsTokenizer()


class _SlowTokenizer(IdsTokenizer):
    """IdsTokenizer that sleeps 50 ms per prompt (a model hook would be refused by the class-name adapters)."""

    def __call__(self, text: str):
        time.sleep(0.05)
        return super().__call__(text)


def slow_tiny_loader(name: str, dtype):
    """tiny_loader whose every prompt first sleeps 50 ms, so that a signal lands while prompts are running."""
    model, _ = tiny_loader(name, dtype)
    return model, _SlowTokenizer()


FLAKY = {"fail": True}


class _FlakyTokenizer(IdsTokenizer):
    """Fails on the prompt "6 6 6" while FLAKY["fail"] is set: a cause the user can fix and retry."""

    def __call__(self, text: str):
        if FLAKY["fail"] and text == "6 6 6":
            raise RuntimeError("a transient failure")
        return super().__call__(text)


def flaky_loader(name: str, dtype):
    """A tiny Llama whose tokenizer fails on "6 6 6" while FLAKY["fail"] is set."""
    return tiny_model("llama", dtype, seed=0), _FlakyTokenizer()


def id_prompts(n: int, lengths: tuple[int, int], seed: int) -> list[str]:
    """n distinct prompts of the tiny tokenizer: space-separated token ids."""
    rng = random.Random(seed)
    return [" ".join(str(rng.randrange(3, 96)) for _ in range(rng.randint(*lengths))) for _ in range(n)]


def tiny_sweep(out, prompts, **kw):
    """run_sweep on the tiny Llama in float64, one thread, without a progress bar."""
    from lllm.apps.sweep import run_sweep

    return run_sweep(SWEEP_MODEL, prompts, out, loader=SWEEP_LOADER, dtype="float64", threads=1, progress=False, **kw)
