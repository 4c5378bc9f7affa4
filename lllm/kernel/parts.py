"""Naming the parts of a decoder: its layers, its final norm, and each layer's attention and MLP.

The op-level linearization needs no module names; the layer-by-layer readouts (paper Fig. 6, Tables 1–3) do,
to read a layer's, an attention's or an MLP's output. transformers' decoders use a handful of attribute names
for these, tried in order below; a decoder that uses none of them gets a clear refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

from lllm.errors import UnsupportedModelError

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
