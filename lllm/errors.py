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


class NumericalRangeError(LLLMError):
    """The model's own forward overflows its dtype (inf or NaN): no Jacobian can reproduce its output."""


class CacheError(LLLMError):
    """A results-cache entry is corrupt or does not match its metadata."""


class LinearizationError(UnsupportedModelError):
    """The detached Jacobian failed to reconstruct its output: some nonlinearity was not frozen."""


class ReplayError(LinearizationError):
    """A recorded forward cannot be replayed on these inputs (a batch, a token window); reverse mode still works."""


class ArgumentError(LLLMError, ValueError):
    """An argument of the API or the CLI is of the wrong type or out of range (checked before any work)."""


class OutputPathError(LLLMError):
    """An output path cannot be written, or writing it would replace an input or a file lllm did not write."""


class OperatorError(LLLMError, ValueError):
    """A DetachedOperator misused: wrong tangent shape, k out of range, or use outside its `with` block."""


class SweepError(LLLMError):
    """A sweep cannot start: bad arguments, prompts or an output that belongs to another sweep."""


class SweepIncompleteError(LLLMError):
    """Some batches failed outside their prompts' analysis (a lost worker, a model that does not load)."""


class NotebookMetadataError(LLLMError):
    """A notebook in the notebooks directory lacks valid ``lllm`` metadata, or two share a chapter."""


class BookBuildError(LLLMError):
    """The book cannot be made as asked: a missing directory, an unknown chapter, clashing model names."""


class StopForward(LLLMError):
    """Not a failure: a hook raises it to end a forward once it has what it reads (the logits, the layers after
    the deepest one needed); the code that ran the forward catches it, so it never reaches the caller."""
