"""The defaults every entry point shares: one model, one prompt, one table of dtypes."""

from __future__ import annotations

import torch

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PROMPT = "The bridge out of Marin is the"  # the paper's running example (Sec. 3)

# dtype name (as the CLI, the cache keys and the notebooks spell it) -> torch dtype
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
