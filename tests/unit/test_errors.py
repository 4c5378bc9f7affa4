"""Bad input gets a clear lllm error, never a silent wrong number."""

import pytest
import torch
from torch import nn

import lllm
from lllm.errors import CoverageError, LinearizationError, MemoryBudgetError, PromptError, UnsupportedModelError
from tiny import IdsTokenizer, tiny_model

TOK = IdsTokenizer()


class Tanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


def test_injected_nonlinear_module_is_linearized_where_it_runs():
    model = tiny_model("llama")
    model.model.layers[1].mlp.act_fn = Tanh().eval()  # not the model's own activation: the op level sees tanh
    result = lllm.detached_jacobian(model, TOK, "1 2 3", progress=False)
    assert result.relative_error <= 5e-6 and result.meta["linearization"]["frozen_ops"]["tanh"] >= 1
    layers = lllm.cumulative_jacobians(model, TOK, "1 2 3", progress=False)
    assert max(layers.relative_errors("mlp")) <= 5e-6


def test_unused_module_in_the_tree_is_not_in_the_way():
    model = tiny_model("mistral")
    model.model.layers[0].extra = nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval()  # never called
    assert lllm.detached_jacobian(model, TOK, "1 2 3", progress=False).relative_error <= 5e-6


def test_layer_readouts_refuse_an_unknown_op_at_its_line():
    from lllm.apps.zoo import tiny_architecture

    model = tiny_architecture("gpt2")
    model.transformer.h[0].mlp.act = SpecialI0().eval()  # torch.special.i0: no entry in the op table
    with pytest.raises(CoverageError, match=r"i0.*transformer\.h\.0\.mlp"):
        lllm.cumulative_jacobians(model, TOK, "1 2 3", progress=False)


class SpecialI0(nn.Module):
    def forward(self, x):
        return torch.special.i0(x)


def test_training_mode_is_refused():
    model = tiny_model("qwen3").train()
    with pytest.raises(UnsupportedModelError, match="eval"):
        lllm.detached_jacobian(model, TOK, "1 2 3", progress=False)


@pytest.mark.parametrize("prompt", ["", "   "])  # an empty list of ids: test_bad_input
def test_empty_prompt_is_refused(prompt):
    with pytest.raises(PromptError):
        lllm.detached_jacobian(tiny_model("llama"), TOK, prompt, progress=False)


def test_prompt_longer_than_the_model_is_refused():
    model = tiny_model("llama")  # 128 positions
    with pytest.raises(PromptError, match="positions"):
        lllm.detached_jacobian(model, TOK, list(range(1, 90)) * 2, progress=False)


def test_prompt_that_would_not_fit_in_memory_is_refused(monkeypatch):
    import psutil

    class Tiny:
        available = 2 * 2**20  # pretend only 2 MiB are free: less than the forward graph, whatever the chunk

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny)
    with pytest.raises(MemoryBudgetError, match="GiB"):
        lllm.detached_jacobian(tiny_model("llama"), TOK, [i % 90 + 1 for i in range(100)], progress=False)


def test_the_default_chunk_adapts_to_the_free_memory(monkeypatch):
    """64 rows per backward where they fit; fewer, as many as fit, where a long prompt would not (T = 512)."""
    import psutil

    from lllm.kernel.jacobian import FIT_FRACTION, default_chunk_size, estimate_jacobian_bytes

    model, ids = tiny_model("llama", torch.float64), [i % 90 + 1 for i in range(100)]
    free = {"bytes": 2**40}

    class Memory:
        @property
        def available(self):
            return free["bytes"]

    monkeypatch.setattr(psutil, "virtual_memory", Memory)
    assert default_chunk_size(model, len(ids), torch.float64) == 32  # every row of d = 32 at once
    free["bytes"] = int(estimate_jacobian_bytes(model, len(ids), 5, torch.float64) / FIT_FRACTION) + 1
    assert default_chunk_size(model, len(ids), torch.float64) == 5
    result = lllm.detached_jacobian(model, TOK, ids, progress=False)  # runs with 5 rows per backward
    assert result.relative_error < 1e-12


def test_self_check_catches_a_wrong_frozen_factor(monkeypatch):
    """If a rule froze the wrong factor (here g = 1 for SiLU, live in the gate split), the tags still prove
    linearity but the result is refused by the numeric self-check, not returned."""
    from lllm.kernel import rules

    monkeypatch.setattr(rules, "activation_factor", lambda name, h, value, kwargs: torch.ones_like(h))
    model = tiny_model("llama", torch.float64)
    with pytest.raises(LinearizationError, match="not frozen"):
        lllm.detached_jacobian(model, TOK, "1 2 3 4", progress=False, mlp_split="gate")
    with pytest.raises(LinearizationError, match="not frozen"):
        lllm.cumulative_jacobians(model, TOK, "1 2 3 4", progress=False, mlp_split="gate")


def test_nested_detached_is_refused():
    model = tiny_model("llama")
    with lllm.detached(model):
        with pytest.raises(UnsupportedModelError, match="nesting"):
            with lllm.detached(model):
                pass
