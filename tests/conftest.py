"""Shared test setup: no model hub, and a clean torch.compile state around every test."""
import contextlib
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


@pytest.fixture(scope="session", autouse=True)
def _session_einfuse_cache(tmp_path_factory):
    """Every test reads and writes a cache of this session only (modules that need an empty one of their own
    take `fresh_einfuse_cache`): a user's ~/.cache/einfuse, or an earlier run's, never answers a test."""
    path = tmp_path_factory.mktemp("einfuse_session_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EINFUSE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def fresh_einfuse_cache(tmp_path_factory):
    """An empty EINFUSE_CACHE_DIR for the whole test module (kernels, pipeline results, AOT checks):
    tests never read a user's cache or one another module's. Yields the directory."""
    path = tmp_path_factory.mktemp("einfuse_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EINFUSE_CACHE_DIR", str(path))
        for var in ("EINFUSE_BACKEND", "EINFUSE_DUMP_DIR", "EINFUSE_CHECK"):
            mp.delenv(var, raising=False)
        yield path


@contextlib.contextmanager
def float32_matmul_precision(value: str):
    """torch's float32 matmul precision (which picks tf32 or IEEE contractions) for a block, restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and other tests share the two cores (use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
