"""lllm: exact detached-Jacobian linearizations of decoder LLMs (Golden, arXiv 2505.24293).

    model, tokenizer = lllm.load("smollm2-135m")
    result = lllm.detached_jacobian(model, tokenizer, "The bridge out of Marin is the")
    result.relative_error  # std(y − Σ J⁺ᵢxᵢ − c)/std(y) ≈ 1e-6 in float32, 1e-15 in float64
"""

__version__ = "0.1.0"

from .decompose import (
    SVD, Decoded, RowColFeatures, combined_svd, decode_input, decode_output, decode_svd, per_token_stable_rank,
    projection_onto, row_col_features, split_right_vectors, stable_rank, svd, token_svds,
)
from .errors import (
    CacheError, CoverageError, LinearizationError, LLLMError, MemoryBudgetError, ModelFileError, PromptError,
    UnknownModelError, UnsupportedModelError,
)
from .jacobian import (
    JacobianResult, detached_jacobian, embed, jvp_reconstruction, ordinary_jacobian, relative_error, tokenize,
)
from .layers import LayerJacobians, cumulative_jacobians, layerwise_jacobians
from .oplevel import detached
from .models import list_embedded, load
from .store import ResultCache, load_result, model_identity, record_to_result, result_to_record, save_result
from .matfree import DetachedOperator, OperatorError, TokenSpectra, all_token_topk, topk_svd
from .generation import GenerationResult, GenerationStep, generate_with_jacobians
from .steering import SteeringOperator, SteeringResult, concept_operator, lambda_sweep, steer
from .analysis import PromptAnalysis, analyze, cached_analyze
