"""The exceptions lllm raises: every refusal is an `LLLMError` with a message that says what to do."""


class LLLMError(Exception):
    """Base class of every error lllm raises on purpose."""


class UnsupportedModelError(LLLMError):
    """The architecture, attention implementation or model state cannot be linearized exactly."""


class CoverageError(UnsupportedModelError):
    """A module in the tree is neither known-linear, patched, nor a declared container."""


class ModelFileError(LLLMError):
    """A model file is missing, corrupt, or does not match its expected sha256."""


class UnknownModelError(LLLMError):
    """A short name that is not an embedded model and not a path or hub id that resolves."""


class PromptError(LLLMError):
    """The prompt is empty or otherwise unusable."""


class MemoryBudgetError(LLLMError):
    """The requested computation would not fit in the available memory."""


class CacheError(LLLMError):
    """A results-cache entry is corrupt or does not match its metadata."""


class LinearizationError(UnsupportedModelError):
    """The detached Jacobian failed to reconstruct its output: some nonlinearity was not frozen."""


class ReplayError(LinearizationError):
    """A recorded forward cannot be replayed on these inputs (a batch, a token window); reverse mode still works."""
