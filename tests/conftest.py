"""Settings every test shares."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tests run tiny models and small matrices: one thread is fastest, and it is immune to
    the spin-wait slowdown of thread pools (torch's and BLAS's) on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
    else:
        with threadpool_limits(1):
            yield
    torch.set_num_threads(before)
