import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread is faster than two fighting over a busy machine (the DeepSeek
    modules ask for it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
