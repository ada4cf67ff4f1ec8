import os
from pathlib import Path

# one OpenMP thread in every process the tests start too (recipes run as subprocesses, two-process training): the
# suite runs as two workers on two cores, and idle OpenMP threads spin on a core another process needs
os.environ['OMP_NUM_THREADS'] = '1'

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get('COMPRESS_SHARED_DATA', ROOT.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f'the real data sets are expected at {SHARED_DATA} (set COMPRESS_SHARED_DATA)')
    return SHARED_DATA


@pytest.fixture(autouse=True, scope='session')
def _one_thread():
    # two OpenMP threads on a shared 2-core machine spin on each other: tiny forwards get 100x slower
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _no_fork_server_left_in_the_test_process():
    # loader workers start from a fork server; one left running in a pytest worker makes that worker's later forks
    # crash (a test far away fails, or the worker dies): loaders with workers run in a subprocess in tests
    from multiprocessing import forkserver
    running_before = forkserver._forkserver._forkserver_pid is not None
    yield
    assert running_before or forkserver._forkserver._forkserver_pid is None, (
        'this test started a fork server in the test process (a loader with workers): run it in a subprocess')


def synthetic_calibration(count: int, batch: int = 32) -> list[torch.Tensor]:
    """Batches of embedded synthetic images: realistic activation ranges for observers, no files needed."""
    from torchvision.transforms.functional import to_tensor

    from compress.data import SyntheticShapes
    data = SyntheticShapes('calib', count)
    images = torch.stack([to_tensor(data[i][0]) for i in range(count)])
    return [images[i:i + batch] for i in range(0, count, batch)]


@pytest.fixture(scope='module')
def tiny_cnn_and_calib():
    import timm

    import compress.models  # noqa: F401
    torch.manual_seed(0)
    return timm.create_model('test_resnet_cifar').eval(), synthetic_calibration(96)
