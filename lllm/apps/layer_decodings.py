"""Tables 1–3: which layers to show, which words to highlight, and the grid of decoded singular vectors.

The decodings themselves come from the cached analysis (PromptAnalysis.meta["layer_decodings"]: per
analyzed layer, the top singular vectors of its cumulative J⁺, each decoded through lm_head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lllm.analyses.pipeline import PromptAnalysis
from lllm.apps.plots import predicted_token, token_text


def later_layers(analysis: PromptAnalysis, n_layers: int, from_fraction: float = 0.5) -> list[int]:
    """The analyzed layers from from_fraction of the model's n_layers on; the last analyzed one if none is."""
    return [ell for ell in analysis.layers if ell >= from_fraction * n_layers] or analysis.layers[-1:]


def salient_words(analysis: PromptAnalysis) -> list[str]:
    """The words worth highlighting: the prediction and the prompt's tokens of more than 3 characters."""
    return [predicted_token(analysis)] + [t for t in analysis.meta["tokens"] if len(t.strip()) > 3]  # not "the", "is"


@dataclass
class DecodingGrid:
    """The decoded top singular vectors of some layers, as the Tables 1–3 figure draws them."""

    layers: list[int]
    sigma: np.ndarray  # (layers, vectors): singular values
    text: list[list[str]]  # (layers, vectors): 'a · b', the first two tokens each vector decodes to
    hit: list[list[bool]]  # (layers, vectors): one of its first n_tokens tokens is a highlighted word


def decoding_grid(analysis: PromptAnalysis, layers: Sequence[int], words: Sequence[str], n_tokens: int = 3
                  ) -> DecodingGrid:
    """The decodings of `layers` (analyzed ones) with their singular values and which hold one of `words`."""
    decodings = [analysis.meta["layer_decodings"][analysis.layers.index(ell)] for ell in layers]
    needles = [w.strip().lower() for w in words]
    return DecodingGrid(
        layers=list(layers),
        sigma=np.array([[e["singular_value"] for e in entries] for entries in decodings]),
        text=[[" · ".join(token_text(t) for t in e["tokens"][:2]) for e in entries] for entries in decodings],
        hit=[[any(t.strip().lower() in needles for t in e["tokens"][:n_tokens]) for e in entries]
             for entries in decodings],
    )
