"""Worker processes forked by the trainer must still die on SIGTERM (they inherit its handler)."""
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from segmentation.engine.evaluation import build_eval_loader
from segmentation.engine.trainer import seed_worker
from segmentation.signals import STOP_SIGNALS, restore_default_stop_handlers


class SigtermDisposition(Dataset):
    """Each item says whether SIGTERM has the default handler in the process that loads it."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.tensor(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)


@pytest.fixture
def trainer_handlers():
    previous = {name: signal.signal(getattr(signal, name), lambda signum, frame: None) for name in STOP_SIGNALS}
    yield
    for name, handler in previous.items():
        signal.signal(getattr(signal, name), handler)


def test_restore_default_stop_handlers(trainer_handlers):
    restore_default_stop_handlers()
    for name in STOP_SIGNALS:
        assert signal.getsignal(getattr(signal, name)) is signal.SIG_DFL


def test_training_loader_workers_get_default_handlers(trainer_handlers):
    loader = DataLoader(SigtermDisposition(), batch_size=2, num_workers=1, worker_init_fn=seed_worker)
    assert next(iter(loader)).all()
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL


def test_evaluation_loader_workers_get_default_handlers(trainer_handlers):
    loader = build_eval_loader(SigtermDisposition(), batch_size=2, num_workers=1, device=torch.device("cpu"))
    assert next(iter(loader)).all()
