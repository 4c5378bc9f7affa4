"""Real shipped weights, offline: the detached Jacobian is exact on every embedded model (issue acceptance 2, 4).

This is the final-J⁺ exactness test of the embedded models; tests/unit/test_oplevel.py has it on a tiny model of
every supported architecture.
"""

import json

import pytest
import torch

import lllm
from lllm.io.codecs import record_to_result
from lllm.apps.cli import main as lllm_main

PROMPT = "The bridge out of Marin is the"
MAX_ERROR = {torch.float32: 5e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name, fixture", [pytest.param(name, fixture, id=name) for name, fixture in [
    ("smollm2-135m", "smollm2"), ("gemma3-270m", "gemma3"), ("qwen2.5-coder-0.5b", "qwen")]])
def test_embedded_model_reconstructs_exactly(name, fixture, dtype, request, capsys):
    model, tokenizer = request.getfixturevalue(fixture if dtype == torch.float32 else f"{fixture}_f64")
    assert model.lllm_source["name"] == name and model.dtype == dtype
    result = lllm.detached_jacobian(model, tokenizer, PROMPT, progress=False)
    top5 = torch.topk(torch.softmax(model.lm_head(result.output).double(), -1), 5)
    with torch.no_grad():  # y is the model's own last hidden state, and its argmax is the model's prediction
        logits = model(torch.tensor([result.token_ids])).logits[0, -1]
    assert int(top5.indices[0]) == int(logits.argmax())
    assert result.relative_error <= MAX_ERROR[dtype]
    if name == "qwen2.5-coder-0.5b":  # v biases: y is affine in x, and c is a large part of it
        assert result.bias is not None and float(result.bias.norm() / result.output.norm()) > 0.1
    else:
        assert result.bias is None
    with capsys.disabled():
        tokens = [(tokenizer.decode([int(i)]), round(float(p), 4)) for p, i in zip(top5.values, top5.indices)]
        print(f"\n{name} {dtype}: error {result.relative_error:.3e}, top-5 {tokens}")


def test_cli_jacobian_prints_and_saves(cli_smollm2, tmp_path, capsys):
    out = tmp_path / "jac"
    assert lllm_main(["jacobian", "--model", "smollm2-135m", "--prompt", PROMPT, "--no-progress", "--save", str(out)]) == 0
    text = capsys.readouterr().out
    assert "error" in text and "stable rank per token" in text and "next" in text
    tensors, meta = lllm.load_result(out)
    assert tensors["jacobian"].shape == (576, 7, 576)
    assert meta["model"]["sha256"] == lllm.io.models.EMBEDDED_MODELS["smollm2-135m"].sha256
    assert meta["prompt"] == PROMPT and len(meta["token_ids"]) == 7
    assert record_to_result(tensors, meta).relative_error <= 5e-6
    json.dumps(meta)  # the metadata is plain JSON


def test_float16_panel_of_fig3_reconstructs_to_float16_precision_or_says_why_not(tmp_cache):
    from lllm.apps import plots

    result, ordinary = plots.float16_panel("smollm2-135m", PROMPT, torch.device("cpu"))
    assert result.jacobian.dtype == torch.float16
    assert 1e-4 < result.relative_error < 1e-2  # float16's precision: the paper reports about 1e-3
    assert lllm.relative_error(result.output, ordinary) > 0.1  # the ordinary J does not reconstruct y
    failed = plots.float16_jacobian("gemma3-270m", PROMPT, torch.device("cpu"))
    assert isinstance(failed, str) and "overflow float16" in failed
