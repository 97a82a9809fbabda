import pytest
import torch

NEEDS_CUDA = 'needs CUDA (no GPU on this machine)'  # .ci/run fails skips whose reason names neither CUDA nor GPU


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """One intra-op thread for the whole suite: the models in the tests are small, and OpenMP
    threads that wait for each other made tests up to 70x slower (1.6 s -> 115 s measured) when
    another process shared the two cores. Subprocesses set their own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where there is no GPU, all with the same reason, so that CI can tell
    them from any other skip (which it fails)."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker('cuda'):
            item.add_marker(pytest.mark.skip(reason=NEEDS_CUDA))
