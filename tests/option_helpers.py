"""Shared by the option-parser tests: a working folder that passes the data checks, the
expected one-line usage error, and the methods' options for tests that build a step's methods."""
import argparse

import pytest

from segmentation.engine.options import parse_options
from segmentation.methods import methods_option_owners


@pytest.fixture
def option_workdir(tmp_path, monkeypatch):
    """Run in a folder whose data/ holds (empty) VOC and ADE folders and the default ImageNet file."""
    monkeypatch.chdir(tmp_path)
    for name in ("PascalVOC12", "ADEChallengeData2016"):
        (tmp_path / "data" / name).mkdir(parents=True)
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "resnet101_iabn_sync.pth.tar").write_bytes(b"weights")
    return tmp_path


def _parse_failure(argv, capsys, code: int) -> str:
    """Parse ``argv``, expect it to fail with exit ``code`` and one error line; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        parse_options(argv)
    assert exit_info.value.code == code
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("train.py: error: ")
    return message


def usage_error(argv, capsys) -> str:
    """Parse ``argv``, expect a usage error (exit code 2), and return its message (one line)."""
    return _parse_failure(argv, capsys, 2)


def method_options(**overrides) -> argparse.Namespace:
    """Every method's options at their defaults (as ``train.py`` parses them), with ``overrides``."""
    parser = argparse.ArgumentParser()
    for owner in methods_option_owners():
        owner.add_options(parser)
    opts = parser.parse_args([])
    for name, value in overrides.items():
        setattr(opts, name, value)
    return opts


def missing_file_error(argv, capsys) -> str:
    """Parse ``argv``, expect the error of a missing file or folder (exit code 1), return its line."""
    message = _parse_failure(argv, capsys, 1)
    assert "--help" not in message
    return message
