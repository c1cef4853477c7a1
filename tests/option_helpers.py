"""Shared by the option-parser tests: a working folder that passes the data checks, and the
expected one-line usage error."""
import pytest

from segmentation.engine.options import parse_options


@pytest.fixture
def option_workdir(tmp_path, monkeypatch):
    """Run in a folder whose data/ holds (empty) VOC and ADE folders and the default ImageNet file."""
    monkeypatch.chdir(tmp_path)
    for name in ("PascalVOC12", "ADEChallengeData2016"):
        (tmp_path / "data" / name).mkdir(parents=True)
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "resnet101_iabn_sync.pth.tar").write_bytes(b"weights")
    return tmp_path


def usage_error(argv, capsys) -> str:
    """Parse ``argv``, expect a usage error, and return its message (one line)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_options(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("train.py: error: ")
    return message
