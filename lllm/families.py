"""Declarative per-family adapters: which module classes are norms, gated MLPs, attention, containers.

An adapter only *names* classes and their conventions; the mechanism that freezes them lives in
`lllm.linearize`. Adding a family is one `register(Family(...))` call whose norm, MLP and
attention styles are among the ones below. The coverage check refuses any module class that no
adapter names, so a new architecture fails loudly instead of giving a silently wrong J⁺.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError

# Norm styles, each a bit-exact replica of transformers' op order with the rsqrt factor frozen:
#   "weight_after_cast":  w * (x32 * rsqrt(mean(x32²)+ε)).to(dtype)        (Llama, Qwen, Phi3, Mistral)
#   "weight_before_cast": (w * (x32 * rsqrt(mean(x32²)+ε))).to(dtype)      (OLMo 2)
#   "one_plus_weight":    ((x32 * rsqrt(mean(x32²)+ε)) * (1 + w32)).to(dtype)  (Gemma 3)
NORM_STYLES = ("weight_after_cast", "weight_before_cast", "one_plus_weight")
# Gated-MLP styles: "split" has gate_proj/up_proj/down_proj/act_fn; "fused" has
# gate_up_proj (gate first, then up) / down_proj / activation_fn (Phi 3).
MLP_STYLES = ("split", "fused")
# Attention styles: where Q and K come from, so that they can be frozen before the kernel.
#   "separate": q_proj and k_proj modules;  "fused_qkv": one qkv_proj, rows ordered q, k, v.
ATTENTION_STYLES = ("separate", "fused_qkv")

# Activations whose act(g)/g tends to 1/2 at g = 0 (used by the alternative "gate" split).
GATE_ACTIVATIONS = ("SiLUActivation", "SiLU", "GELUTanh", "PytorchGELUTanh", "GELUActivation", "GELU")
# Modules that are linear in their input (or constant in it) for every family.
LINEAR_MODULES = ("Linear", "Dropout", "Identity")


@dataclass(frozen=True)
class Family:
    """One decoder family: the classes lllm knows, and how each is linearized."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values served by this adapter
    norms: dict[str, str]  # class name -> norm style
    mlps: dict[str, str]  # class name -> MLP style
    attentions: dict[str, str]  # class name -> attention style
    containers: tuple[str, ...]  # classes that only route tensors: causal LM, base model, decoder layer
    embeddings: tuple[str, ...] = ("Embedding",)  # lookups used to build x, never on the J path
    rotary: tuple[str, ...] = ()  # position-only modules: constant in x
    frozen_children: tuple[str, ...] = ("q_norm", "k_norm")  # attention children that only see frozen Q/K
    notes: str = ""


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family adapter to the registry (validated) and return it."""
    for style in family.norms.values():
        assert style in NORM_STYLES, style
    for style in family.mlps.values():
        assert style in MLP_STYLES, style
    for style in family.attentions.values():
        assert style in ATTENTION_STYLES, style
    FAMILIES[family.name] = family
    return family


def _llama_like(name: str, prefix: str, model_types: tuple[str, ...], notes: str, **kw) -> Family:
    """A Llama-shaped family: {prefix}RMSNorm, {prefix}MLP, {prefix}Attention, {prefix}DecoderLayer."""
    return Family(
        name=name,
        model_types=model_types,
        norms={f"{prefix}RMSNorm": kw.pop("norm_style", "weight_after_cast")},
        mlps={f"{prefix}MLP": kw.pop("mlp_style", "split")},
        attentions={f"{prefix}Attention": kw.pop("attention_style", "separate")},
        containers=(f"{prefix}ForCausalLM", f"{prefix}Model", f"{prefix}DecoderLayer", "ModuleList"),
        rotary=(f"{prefix}RotaryEmbedding",),
        notes=notes,
        **kw,
    )


register(_llama_like("llama", "Llama", ("llama",), "Llama 3 / SmolLM2: GQA, rope scaling."))
register(_llama_like("mistral", "Mistral", ("mistral", "ministral"), "Mistral and Ministral."))
register(_llama_like("qwen2", "Qwen2", ("qwen2",), "Qwen 2/2.5: q/k/v biases make y affine (bias c)."))
register(_llama_like("qwen3", "Qwen3", ("qwen3",), "Qwen 3 and the DeepSeek-R1-0528 distill: q/k norms."))
register(
    _llama_like(
        "phi3", "Phi3", ("phi3",), "Phi 3/4: fused qkv_proj and gate_up_proj.",
        mlp_style="fused", attention_style="fused_qkv",
    )
)
register(
    _llama_like(
        "olmo2", "Olmo2", ("olmo2",), "OLMo 2: post-attention/post-MLP norms, q/k norms over all heads.",
        norm_style="weight_before_cast",
    )
)
register(
    Family(
        name="gemma3",
        model_types=("gemma3_text", "gemma3"),
        norms={"Gemma3RMSNorm": "one_plus_weight"},
        mlps={"Gemma3MLP": "split"},
        attentions={"Gemma3Attention": "separate"},
        containers=("Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3DecoderLayer", "ModuleList"),
        embeddings=("Gemma3TextScaledWordEmbedding", "Embedding"),
        rotary=("Gemma3RotaryEmbedding",),
        notes="Gemma 3: (1 + w) norms, pre/post feed-forward norms, q/k norms, √d embedding scale, "
        "attention soft-capping and sliding window (both act on frozen Q·K).",
    )
)


def family_of(model) -> Family:
    """The adapter serving `model` (by config.model_type), or a clear UnsupportedModelError."""
    model_type = getattr(model.config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedModelError(
        f"lllm has no adapter for model_type={model_type!r} ({type(model).__name__}). "
        f"Supported model types: {', '.join(supported)}. Adding one is a `register(Family(...))` call in "
        "lllm/families.py."
    )


# ---------------------------------------------------------------------------------------------
# Naming the parts of any decoder, for layer-by-layer readouts on the op-level path.
# ---------------------------------------------------------------------------------------------

# Attribute names transformers' decoders use, tried in order: the final norm, and per layer the
# attention and MLP submodules (GPT-2: ln_f/attn/mlp; Bloom: self_attention; GPT-NeoX: attention).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
SUBMODULE_NAMES = {"attn": ("self_attn", "attn", "attention", "self_attention"),
                   "mlp": ("mlp", "feed_forward", "block_sparse_moe")}


@dataclass(frozen=True)
class DecoderParts:
    """Where a decoder keeps its layers, its final norm and each layer's attention and MLP."""

    decoder: object  # the module that takes inputs_embeds and returns last_hidden_state
    layers: object  # the ModuleList of decoder layers
    norm: object | None  # the final norm (None if the decoder has none)
    submodules: dict[str, str]  # component ("attn", "mlp") -> attribute name on each layer


def decoder_parts(model) -> DecoderParts:
    """The decoder's layers, final norm and components, found by transformers' usual names; or a clear refusal."""
    import torch.nn as nn

    decoder = model.get_decoder()
    n_layers = model.config.get_text_config().num_hidden_layers
    layers = next((m for _, m in decoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)
    if layers is None:
        raise UnsupportedModelError(f"{type(decoder).__name__} has no ModuleList of its {n_layers} layers")
    norm = next((getattr(decoder, n) for n in FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)), None)
    first = layers[0]
    submodules = {comp: next(n for n in names if isinstance(getattr(first, n, None), nn.Module))
                  for comp, names in SUBMODULE_NAMES.items() if any(isinstance(getattr(first, n, None), nn.Module)
                                                                    for n in names)}
    return DecoderParts(decoder=decoder, layers=layers, norm=norm, submodules=submodules)
