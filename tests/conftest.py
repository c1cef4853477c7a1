import os

import pytest
import torch

# Tests run on 2 CPU cores in CI; one intra-op thread per process keeps parallel runs predictable.
torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
