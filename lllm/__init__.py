"""lllm: exact detached-Jacobian linearizations of decoder LLMs (Golden, arXiv 2505.24293).

    model, tokenizer = lllm.load("smollm2-135m")
    result = lllm.detached_jacobian(model, tokenizer, "The bridge out of Marin is the")
    result.relative_error  # std(y − Σ J⁺ᵢxᵢ − c)/std(y) ≈ 1e-6 in float32, 1e-15 in float64

The names below are the public API (what the README, the notebooks and the book use). They are
imported on first use, so `import lllm` and `lllm --help` do not load torch or transformers.
Everything else is importable from its own module: lllm.kernel (linearization and Jacobian
engines), lllm.analyses (decompositions, the per-prompt pipeline, generation, steering), lllm.io
(models and the results store) and lllm.apps (the command line, the book, the sweep, the figures).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "load": "lllm.io.models",
    "list_embedded": "lllm.io.embedded",
    "save_result": "lllm.io.store",
    "load_result": "lllm.io.store",
    "detached": "lllm.kernel.oplevel",
    "JacobianResult": "lllm.kernel.jacobian",
    "detached_jacobian": "lllm.kernel.jacobian",
    "ordinary_jacobian": "lllm.kernel.jacobian",
    "jvp_reconstruction": "lllm.kernel.jacobian",
    "relative_error": "lllm.kernel.jacobian",
    "LayerJacobians": "lllm.kernel.layers",
    "cumulative_jacobians": "lllm.kernel.layers",
    "layerwise_jacobians": "lllm.kernel.layers",
    "DetachedOperator": "lllm.kernel.matfree",
    "topk_svd": "lllm.kernel.matfree",
    "svd": "lllm.kernel.svd",
    "token_svds": "lllm.analyses.decompose",
    "stable_rank": "lllm.analyses.decompose",
    "per_token_stable_rank": "lllm.analyses.decompose",
    "decode_svd": "lllm.analyses.decompose",
    "decode_output": "lllm.analyses.decompose",
    "row_col_features": "lllm.analyses.decompose",
    "PromptAnalysis": "lllm.analyses.pipeline",
    "analyze": "lllm.analyses.pipeline",
    "generate_with_jacobians": "lllm.analyses.generation",
    "concept_operator": "lllm.analyses.steering",
    "steer": "lllm.analyses.steering",
    "LLLMError": "lllm.errors",
    "CoverageError": "lllm.errors",
    "UnsupportedModelError": "lllm.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'lllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # for type checkers and editors; never executed
    from lllm.analyses.decompose import (
        decode_output, decode_svd, per_token_stable_rank, row_col_features, stable_rank, svd, token_svds,
    )
    from lllm.analyses.generation import generate_with_jacobians
    from lllm.analyses.pipeline import PromptAnalysis, analyze
    from lllm.analyses.steering import concept_operator, steer
    from lllm.errors import CoverageError, LLLMError, UnsupportedModelError
    from lllm.io.embedded import list_embedded
    from lllm.io.models import load
    from lllm.io.store import load_result, save_result
    from lllm.kernel.jacobian import (
        JacobianResult, detached_jacobian, jvp_reconstruction, ordinary_jacobian, relative_error,
    )
    from lllm.kernel.layers import LayerJacobians, cumulative_jacobians, layerwise_jacobians
    from lllm.kernel.matfree import DetachedOperator, topk_svd
    from lllm.kernel.oplevel import detached
