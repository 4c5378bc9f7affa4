"""lllm: exact detached-Jacobian linearizations of decoder LLMs (Golden, arXiv 2505.24293)."""

from .errors import (
    CoverageError, LinearizationError, LLLMError, MemoryBudgetError, ModelFileError, PromptError,
    UnknownModelError, UnsupportedModelError,
)
from .jacobian import JacobianResult, detached_jacobian, embed, ordinary_jacobian, relative_error, tokenize
from .linearize import check_coverage, detached

__version__ = "0.1.0"


def load(name_or_path, dtype=None, **kw):
    """(model, tokenizer) for an embedded short name, hub id, local directory or GGUF file; eager attention."""
    import torch

    from .models import load as _load

    return _load(name_or_path, dtype=dtype or torch.float32, **kw)
