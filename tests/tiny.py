"""Tiny random-config models of every supported family, built from transformers' own classes."""

from __future__ import annotations

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


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A few-thousand-parameter random model of `family`, in eval mode, weights scaled to be non-trivial."""
    config_cls, model_cls, extra = FAMILY_CONFIGS[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norm weights so that (1 + w) and w conventions both matter
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "gemma" not in family else 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    model.requires_grad_(False)
    return model


class IdsTokenizer:
    """A stand-in tokenizer for tiny models: text is a space-separated list of token ids."""

    def __call__(self, text: str):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids):
        return " ".join(f"<{i}>" for i in ids)
