"""Shared by the option-parser tests: a working folder that passes the data checks, the
expected one-line errors, and a configuration for tests that build a step's methods."""

import pytest

from segmentation.config import Config
from segmentation.engine.options import parse_options
from segmentation.errors import SetupError, UsageError


@pytest.fixture
def option_workdir(tmp_path, monkeypatch):
    """Run in a folder whose data/ holds (empty) VOC and ADE folders and the default ImageNet file."""
    monkeypatch.chdir(tmp_path)
    for name in ("PascalVOC12", "ADEChallengeData2016"):
        (tmp_path / "data" / name).mkdir(parents=True)
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "resnet101_iabn_sync.pth.tar").write_bytes(b"weights")
    return tmp_path


def _parse_failure(argv, error_type) -> str:
    """Parse ``argv``, expect ``error_type`` with a one-line message; return the message."""
    with pytest.raises(error_type) as failure:
        parse_options(argv)
    message = str(failure.value)
    assert message and "\n" not in message
    return message


def usage_error(argv) -> str:
    """Parse ``argv``, expect a usage error (exit code 2), and return its message (one line)."""
    message = _parse_failure(argv, UsageError)
    assert UsageError.exit_code == 2
    return message


def missing_file_error(argv) -> str:
    """Parse ``argv``, expect the error of a missing file or folder (exit code 1), return its message."""
    message = _parse_failure(argv, SetupError)
    assert SetupError.exit_code == 1
    return message


def synthetic_config(*argv: str, **overrides) -> Config:
    """The configuration of ``train.py --dataset synthetic --task 15-5 argv`` (with a data folder
    that is never read), with ``overrides`` (engine and method options alike)."""
    config = parse_options(["--dataset", "synthetic", "--task", "15-5", "--data_root", "unread-data", *argv])
    return config.replace(**overrides)
