"""Settings shared by the whole suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The tensors and models in these tests are small: a second intra-op thread gains nothing, and on
    # a shared 2-core machine an oversubscribed OpenMP pool makes them several times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
