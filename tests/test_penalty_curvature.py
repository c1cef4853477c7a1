"""launch/penalty_curvature.py: the largest curvature of the EWC, PI and RW penalties a step
checkpoint starts, from the same normalised importance the penalty uses."""
import importlib.util
import os
import re

import pytest
import torch

from train_cli_worker import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "launch", "penalty_curvature.py")
spec = importlib.util.spec_from_file_location("penalty_curvature", SCRIPT)
penalty_curvature = importlib.util.module_from_spec(spec)
spec.loader.exec_module(penalty_curvature)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_reports_the_largest_normalised_importance_and_the_learning_rate_limit(tmp_path, capsys):
    fisher = {"a": _t([1e-10, 3e-10]), "b": _t([0.0, 2.0, 1.0])}
    score = {"a": _t([0.0, 4.0]), "b": _t([5.0, 5.0, 5.0])}
    path = tmp_path / "step0.pth"
    torch.save({"method_states": {"ewc": {"name": "ewc", "fisher": fisher},
                                 "rw": {"name": "rw", "fisher": fisher, "score": score}}}, path)
    assert penalty_curvature.main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out

    # EWC (weight 500): "b" spreads over 2, so its largest importance is 2 / (2 + 1e-8); "a" spreads
    # over 2e-10 and stays at 2e-10 / (2e-10 + 1e-8).
    largest = 2 / (2 + 1e-8)
    ewc = re.search(r"^ewc: 2 tensors; largest normalised importance ([\d.]+); 1 tensors reach 0.5, 1 reach 0.99$",
                    out, re.MULTILINE)
    assert ewc and float(ewc.group(1)) == pytest.approx(largest, rel=1e-5)
    limit = 1 + 1 / (1 + 2 * 0.9)
    lr = re.search(r"largest curvature 2 x 500 x [\d.]+ = ([\d.]+); SGD with Nesterov momentum 0.9 diverges above "
                   r"learning rate ([\d.]+)", out)
    assert float(lr.group(1)) == pytest.approx(1000 * largest, rel=1e-5)
    assert float(lr.group(2)) == pytest.approx(limit / (1000 * largest), rel=1e-5)
    assert re.search(r"^    ([\d.e-]+)  a$", out, re.MULTILINE).group(1) == f"{2e-10 / (2e-10 + 1e-8):.6g}"

    # RW (weight 100): Fisher plus score, each normalised; "a" reaches 0.0196 + 4 / (4 + 1e-8).
    rw_a = 2e-10 / (2e-10 + 1e-8) + 4 / (4 + 1e-8)
    rw = re.search(r"^rw: 2 tensors; largest normalised importance ([\d.]+)", out, re.MULTILINE)
    assert float(rw.group(1)) == pytest.approx(rw_a, rel=1e-5)
    assert f"largest curvature 2 x 100 x {rw_a:.6g} = {200 * rw_a:.6g}" in out


def test_a_checkpoint_without_regularizer_state_is_an_error(tmp_path, capsys):
    path = tmp_path / "step0.pth"
    torch.save({"model_state": {}}, path)
    with pytest.raises(SystemExit):
        penalty_curvature.main([str(path)])
    assert "no regularizer state" in capsys.readouterr().err
