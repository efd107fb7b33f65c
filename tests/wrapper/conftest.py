"""Fixtures of the Hugging Face wrapper tests."""
import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny models are all per-op overhead: extra intra-op threads only add contention
    (several times slower on a loaded 2-core machine). A test module opts in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``; the previous setting is
    restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
