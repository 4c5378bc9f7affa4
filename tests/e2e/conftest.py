"""Fixtures of the end-to-end tier."""

import pytest
from tiny_book import build_tiny_book


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> dict:
    """The test book (tests/tiny_book.py), run and built once per session: test_book.py checks the driver's
    report and outputs, test_browser.py opens the pages."""
    with pytest.MonkeyPatch.context() as patch:
        return build_tiny_book(tmp_path_factory.mktemp("lllm-book"), patch)
