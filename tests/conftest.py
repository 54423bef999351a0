"""Shared test setup: no model hub, and a clean torch.compile state around every test."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports transformers: models come from local files only

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_dynamo():
    """torch.compile caches graphs per process; a test must not reuse (or trip over) another test's."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
