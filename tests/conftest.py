import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M in float32, loaded once for the whole session (real weights, offline)."""
    import lllm

    return lllm.load("smollm2-135m")
