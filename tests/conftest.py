import pytest
import torch


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """One intra-op thread for the whole suite: the models in the tests are small, and OpenMP
    threads that wait for each other made tests up to 70x slower (1.6 s -> 115 s measured) when
    another process shared the two cores. Subprocesses set their own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
