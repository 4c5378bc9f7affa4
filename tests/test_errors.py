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


def test_injected_unknown_nonlinear_module_is_refused_by_name_by_the_adapters_and_linearized_at_the_op_level():
    model = tiny_model("llama")
    model.model.layers[1].mlp.act_fn = Tanh().eval()  # still named act_fn, but not a known gate activation
    with pytest.raises(CoverageError, match=r"model\.layers\.1\.mlp\.act_fn.*Tanh"):
        lllm.cumulative_jacobians(model, TOK, "1 2 3", progress=False)
    result = lllm.detached_jacobian(model, TOK, "1 2 3", progress=False)  # the op level sees tanh: h·g(h)
    assert result.relative_error <= 5e-6 and result.meta["linearization"]["frozen_ops"]["tanh"] >= 1


def test_unknown_module_anywhere_is_refused():
    model = tiny_model("mistral")
    model.model.layers[0].extra = nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval()
    with pytest.raises(CoverageError, match=r"model\.layers\.0\.extra"):
        with lllm.detached(model):
            pass


@pytest.mark.parametrize("impl", ["sdpa"])
def test_non_eager_attention_is_refused_by_the_adapters(impl):
    model = tiny_model("llama", attn_implementation=impl)
    with pytest.raises(UnsupportedModelError, match="eager"):
        lllm.cumulative_jacobians(model, TOK, "1 2 3", progress=False)


def test_layer_readouts_refuse_an_unknown_op_at_its_line():
    from lllm.zoo import tiny_architecture

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


@pytest.mark.parametrize("prompt", ["", "   ", []])
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
        available = 10 * 2**20  # pretend only 10 MiB are free

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny)
    with pytest.raises(MemoryBudgetError, match="GiB"):
        lllm.detached_jacobian(tiny_model("llama"), TOK, [i % 90 + 1 for i in range(100)], progress=False)


def test_out_of_vocabulary_ids_are_refused():
    with pytest.raises(PromptError, match="vocabulary"):
        lllm.detached_jacobian(tiny_model("llama"), TOK, [1, 2, 500], progress=False)


def test_self_check_catches_a_nonlinearity_that_escapes_the_patches(monkeypatch):
    """If a patch silently stopped freezing (here: the MLP patch), the result is refused, not returned."""
    from lllm import linearize

    def leaky_mlp(self, x, *, lin, key, style):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # nothing frozen

    monkeypatch.setattr(linearize, "_mlp_forward", leaky_mlp)
    with pytest.raises(LinearizationError, match="not frozen"):
        lllm.cumulative_jacobians(tiny_model("llama", torch.float64), TOK, "1 2 3 4", progress=False)


def test_nested_detached_is_refused():
    model = tiny_model("llama")
    with lllm.detached(model):
        with pytest.raises(UnsupportedModelError, match="nesting"):
            with lllm.detached(model):
                pass
