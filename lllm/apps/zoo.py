"""Tiny random models of transformers' own classes: what the tests and the supported-architectures page run.

`tiny_architecture(name)` builds one of ARCHITECTURES (a few thousand parameters, random non-zero biases and
norm weights, eager attention and experts); `check_architecture` runs lllm on it the way the tests do and
returns one row of the supported-architectures table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T

COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=96, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    attn_implementation="eager",
)

# family -> (config class, model class, family-specific options that exercise its quirks)
FAMILY_CONFIGS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM,
              dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64})),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
               dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                    attn_logit_softcapping=20.0, final_logit_softcapping=30.0, query_pre_attn_scalar=8)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=4)),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, {}),
}


# Every architecture the op-level linearization is tested on: name -> (config class, model class, options).
# Configs of other shapes than COMMON name their sizes themselves; each exercises its family's quirks.
_H = {k: v for k, v in COMMON.items() if k != "attn_implementation"}
_H.pop("head_dim")
ARCHITECTURES = {
    **{name: (cfg, cls, {**_H, "head_dim": 8, **extra}) for name, (cfg, cls, extra) in FAMILY_CONFIGS.items()},
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=128,
                                                   bos_token_id=1, eos_token_id=2)),  # LayerNorm+bias, wpe, tanh-GELU
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(_H, rotary_pct=0.5, use_parallel_residual=True)),
    "phi": (T.PhiConfig, T.PhiForCausalLM, dict(_H, partial_rotary_factor=0.5)),
    "falcon": (T.FalconConfig, T.FalconForCausalLM, dict(  # multi-query, parallel attention + MLP
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=96, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, bias=True)),
    "falcon_alibi": (T.FalconConfig, T.FalconForCausalLM, dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=96, alibi=True, multi_query=False,
        parallel_attn=False, bias=True)),
    "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, dict(_H, qk_layernorm=True, use_qkv_bias=True)),
    "olmo": (T.OlmoConfig, T.OlmoForCausalLM, _H),  # non-parametric LayerNorm
    "starcoder2": (T.Starcoder2Config, T.Starcoder2ForCausalLM, dict(_H, use_bias=True, sliding_window=4)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(_H, head_dim=8)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(
        _H, head_dim=8, sliding_window=4, attn_logit_softcapping=20.0, final_logit_softcapping=30.0,
        query_pre_attn_scalar=8)),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(_H, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(
        _H, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)),
    "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, dict(_H, num_experts=4, num_experts_per_tok=2)),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, dict(
        _H, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0)),
    "cohere": (T.CohereConfig, T.CohereForCausalLM, dict(_H, logit_scale=0.5)),
    "smollm3": (T.SmolLM3Config, T.SmolLM3ForCausalLM, dict(_H, no_rope_layer_interval=2)),  # NoPE layers
    "gptj": (T.GPTJConfig, T.GPTJForCausalLM, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=128,
                                                   rotary_dim=4, bos_token_id=1, eos_token_id=2)),
    "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=96)),  # ALiBi
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(  # ReLU, learned positions
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=96,
        max_position_embeddings=128, word_embed_proj_dim=32)),
    "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM, dict(  # sinks, clamped SwiGLU, (up + 1)·glu
        _H, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])),
    "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM, dict(  # multi-head latent attention, grouped router
        _H, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1)),
}


def randomize(model, gemma_norms: bool = False):
    """Non-trivial random weights, random non-zero biases, norm weights around 1 (around 0 for (1 + w) norms)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name or "layernorm" in name:
                p.copy_(0.3 * torch.randn_like(p) if gemma_norms else 1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def tiny_architecture(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, attn_implementation="eager"):
    """A tiny random model of architecture `name` (ARCHITECTURES), eval mode, eager experts, no grads."""
    config_cls, model_cls, options = ARCHITECTURES[name]
    config = config_cls(**options)
    config._attn_implementation = attn_implementation
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    torch.manual_seed(seed)
    model = randomize(model_cls(config).to(dtype).eval(), gemma_norms=name in ("gemma", "gemma2", "gemma3"))
    return model.requires_grad_(False)


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A random model of `family` (a few thousand parameters, unless `overrides` name larger sizes), in eval mode,
    weights scaled to be non-trivial."""
    config_cls, model_cls, extra = FAMILY_CONFIGS[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = randomize(model_cls(config).to(dtype).eval(), gemma_norms="gemma" in family)
    return model.requires_grad_(False)


class IdsTokenizer:
    """A stand-in tokenizer for tiny models: text is a space-separated list of token ids."""

    def __call__(self, text: str):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids):
        return " ".join(f"<{i}>" for i in ids)


def lm_head_reads(model, ids: list[int]) -> torch.Tensor:
    """What the output embedding really reads at the last position, in the model's own forward on token ids."""
    read = {}
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: read.setdefault("y", args[0]))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return read["y"][0, -1]


def check_architecture(build: Callable[[torch.dtype], torch.nn.Module], ids: list[int]) -> dict:
    """One row of the supported-architectures table: fp32/fp64 errors, bitwise forward, frozen ops, split.

    `build(dtype)` returns a fresh model. Raises what lllm raises (an LLLMError is a refusal).
    """
    import lllm
    from lllm.kernel.jacobian import embed
    from lllm.kernel.oplevel import detached

    prompt = " ".join(map(str, ids))
    m32, m64 = build(torch.float32), build(torch.float64)
    r32 = lllm.detached_jacobian(m32, IdsTokenizer(), prompt, progress=False)  # refuses first, if it must
    r64 = lllm.detached_jacobian(m64, IdsTokenizer(), prompt, progress=False)
    x = embed(m32, ids)
    with torch.no_grad():
        reference = m32(inputs_embeds=x[None].clone(), use_cache=False).logits
    with detached(m32):
        logits = m32(inputs_embeds=x.clone().requires_grad_(True)[None].clone(), use_cache=False).logits
    ordinary = lllm.ordinary_jacobian(m64, IdsTokenizer(), prompt, progress=False).relative_error
    row = {
        "class": type(m32).__name__, "fp32": r32.relative_error, "fp64": r64.relative_error, "ordinary": ordinary,
        "bitwise_forward": bool(torch.equal(logits.detach(), reference)),
        "y_is_what_lm_head_reads": bool(torch.equal(r32.output, lm_head_reads(m32, ids))),
        "affine": r64.bias is not None, **r64.meta["linearization"],
    }
    exact = (row["fp32"] <= 5e-6 and row["fp64"] <= 1e-12 and ordinary >= 1e-2 and row["bitwise_forward"]
             and row["y_is_what_lm_head_reads"])
    return {**row, "verdict": "exact" if exact else "WRONG"}


# The prompt of the tests: 10 token ids, longer than the tiny configs' sliding windows of 4.
TEST_IDS = [1, 5, 9, 17, 33, 41, 60, 77, 80, 12]


def architecture_table(names: list[str], ids: list[int] = TEST_IDS):
    """The supported-architectures table (a DataFrame), one tiny model per name, computed now."""
    import pandas as pd

    from lllm.errors import LLLMError

    rows = []
    for name in names:
        try:
            row = check_architecture(lambda dtype, name=name: tiny_architecture(name, dtype), ids)
        except LLLMError as error:
            rows.append({"architecture": name, "class": ARCHITECTURES[name][1].__name__, "verdict": f"refused: {error}"})
            continue
        rows.append({
            "architecture": name, "class": row["class"], "verdict": row["verdict"], "fp32 error": f"{row['fp32']:.1e}",
            "fp64 error": f"{row['fp64']:.1e}", "bitwise fp32 forward": row["bitwise_forward"],
            "y = lm_head input": row["y_is_what_lm_head_reads"], "ordinary J error": round(row["ordinary"], 2),
            "frozen / rewritten ops": ", ".join(row["frozen_ops"]), "gated products": row["split"],
        })
    return pd.DataFrame(rows)


def survey_summary(path):
    """(a sentence, a DataFrame): what benchmarks/architecture_survey.py found for every *ForCausalLM class, or
    (why it is absent, None)."""
    import json
    from pathlib import Path

    import pandas as pd

    path = Path(path)
    if not path.exists():
        return f"**No survey**: `{path.name}` does not exist; `python benchmarks/architecture_survey.py` writes it.", None
    survey = json.loads(path.read_text())
    counts = ", ".join(f"{n} {verdict}" for verdict, n in survey["counts"].items())
    sentence = (f"Survey of {len(survey['rows'])} `*ForCausalLM` classes of transformers {survey['transformers']}: "
                f"{counts}. *Not built* means the generic tiny config did not build (no verdict); *crashed* a raw "
                "exception instead of an lllm error.")
    rows = [{"class": r["class"], "verdict": r["verdict"], "fp64 error": f"{r['fp64']:.1e}" if "fp64" in r else "",
             "why": r.get("why", "").split(" at /")[0][:140]} for r in survey["rows"]]
    return sentence, pd.DataFrame(rows)
