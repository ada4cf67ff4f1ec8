import os
from pathlib import Path

import pytest
import torch

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
