import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The analysis tests use tiny networks: one thread is fastest (no oversubscription on a
    shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
