"""Pieces of the checks before training: original checkpoints, the batch against the normalisation,
the penalty's learning-rate warning, torchvision's ImageNet weights (fetched once, before training)."""

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision

from segmentation.engine.original_checkpoint import adapt_checkpoint, convert_original_checkpoint, head_widths
from option_helpers import synthetic_config
from segmentation import distributed
from segmentation.engine import checks
from segmentation.engine.checks import check_pretrained, check_training, fetch_pretrained, run_checks
from segmentation.engine.run_files import RunFiles
from segmentation.errors import SetupError, UsageError
from segmentation.methods import active_methods
from segmentation.methods.weight_penalty import nesterov_stability_limit
from segmentation.models import build_model
from train_cli_worker import run_train_in_process, train_args

def _original(model, drop_buffers=True):
    state = model.state_dict()
    return {"epoch": 30, "optimizer_state": {}, "model_state": {
        "module." + key: value for key, value in state.items()
        if not (drop_buffers and key.endswith("num_batches_tracked"))}}


@pytest.mark.parametrize("norm_act", ["iabn", "abn"])
def test_original_checkpoint_gives_the_same_function(norm_act, tmp_path):
    classes = [16, 5]
    source = build_model(classes, backbone="resnet18", norm_act="iabn", pooling_size=None).eval()
    for module in source.modules():  # non-trivial statistics and scales, some negative
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.weight.data.uniform_(-1.5, 1.5)
    converted = convert_original_checkpoint(_original(source), "voc", "15-5", 1, norm_act, tmp_path / "o.pth")
    assert converted["classes"] == classes and converted["step"] == 1
    target = build_model(classes, backbone="resnet18", norm_act=norm_act, pooling_size=None).eval()
    target.load_state_dict(converted["model_state"], strict=True)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(image)[0], source(image)[0], rtol=1e-4, atol=1e-4)


def test_original_checkpoint_of_other_classes_is_refused(tmp_path):
    model = build_model([16], backbone="resnet18", norm_act="iabn")
    original = _original(model)
    assert head_widths({k[7:]: v for k, v in original["model_state"].items()}) == [16]
    with pytest.raises(ValueError, match=r"o\.pth.*\[16\].*\[20\]"):
        convert_original_checkpoint(original, "voc", "19-1", 0, "iabn", tmp_path / "o.pth")
    ours = {"classes": [16], "model_state": {}}
    assert adapt_checkpoint(ours, "voc", "15-5", 0, "iabn", tmp_path / "x.pth") == (ours, False)
    with pytest.raises(ValueError, match="neither"):
        adapt_checkpoint({"weights": 1}, "voc", "15-5", 0, "iabn", tmp_path / "x.pth")


@pytest.mark.parametrize("norm_act, batch_size, world_size, refused", [
    ("iabn_sync", 1, 1, True),   # one image in all
    ("iabn_sync", 1, 2, False),  # one image per process, two in the synchronised batch
    ("iabn", 1, 2, True),        # unsynchronised: each process normalises over one image
    ("abn", 2, 1, False),
])
def test_batch_size_against_normalisation(norm_act, batch_size, world_size, refused):
    config = synthetic_config(backbone="resnet18", test=False, norm_act=norm_act, batch_size=batch_size)
    if refused:
        with pytest.raises(UsageError, match="--batch_size 1"):
            check_training(config, world_size)
    else:
        check_training(config, world_size)
    check_training(config.replace(test=True), world_size)  # testing has no training batch


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_nesterov_stability_limit_is_where_pytorch_sgd_starts_to_diverge(momentum):
    curvature = 1000.0  # EWC's penalty 500 * w^2 at importance 1
    limit = nesterov_stability_limit(momentum)
    for lr, diverges in ((0.97 * limit / curvature, False), (1.03 * limit / curvature, True)):
        weight = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        optimizer = torch.optim.SGD([weight], lr=lr, momentum=momentum, nesterov=momentum > 0)
        for _ in range(2000):
            optimizer.zero_grad()
            (curvature / 2 * weight ** 2).sum().backward()
            optimizer.step()
        assert (abs(weight.item()) > 1) == diverges, (lr, weight.item())


def unstable_penalty_warning(opts):
    """The launch warnings of the active methods (at most one here), or None."""
    warnings = [warning for method in active_methods(opts) for warning in method.launch_warnings(opts)]
    assert len(warnings) <= 1
    return warnings[0] if warnings else None


def test_unstable_penalty_is_warned_about_with_the_learning_rate_that_works():
    # EWC and PI: 500 x importance <= 1, curvature 1000; limit 1.357 at momentum 0.9.
    warning = unstable_penalty_warning(synthetic_config("--method", "EWC", "--step", "all", "--lr", "0.01",
                                                      "--incremental_lr", "0.002"))
    assert "ewc penalty is unstable at step 1" in warning and "below 0.00136" in warning
    for safe in (["--step", "all", "--lr", "0.01", "--incremental_lr", "0.001"],  # the protocol
                 ["--step", "0", "--lr", "0.01"],  # no penalty at step 0
                 ["--step", "1", "--lr", "0.002", "--reg_no_normalize"]):  # importances unbounded: no claim
        assert unstable_penalty_warning(synthetic_config("--method", "PI", *safe)) is None, safe
    # RW: 100 x (Fisher + score) <= 200, curvature 400.
    assert unstable_penalty_warning(synthetic_config("--method", "RW", "--step", "1", "--lr", "0.003")) is None
    assert "below 0.00339" in unstable_penalty_warning(synthetic_config("--method", "RW", "--step", "1", "--lr", "0.004"))
    assert unstable_penalty_warning(synthetic_config("--method", "MiB", "--step", "1", "--lr", "1")) is None


# ---------------------------------------------------------------- --pretrained torchvision
# (conftest.py's torch_hub fixture: an empty cache and no network)


RESNET18_URL = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url


def _resnet18_cache_file(torch_hub) -> Path:
    return torch_hub / RESNET18_URL.rsplit("/", 1)[1]  # resnet18-<hash>.pth


def _save_resnet18_weights(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)


def _torchvision_config(tmp_path, *argv):
    return synthetic_config("--backbone", "resnet18", "--norm_act", "abn", "--pretrained", "torchvision", *argv,
                            checkpoint_dir=str(tmp_path / "checkpoints"), logdir=str(tmp_path / "logs"))


def _offline(monkeypatch):
    def unreachable(url, dst, *args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr("torch.hub.download_url_to_file", unreachable)


def test_cached_torchvision_weights_pass_without_network(tmp_path, torch_hub):
    _save_resnet18_weights(_resnet18_cache_file(torch_hub))
    config = _torchvision_config(tmp_path)
    fetch_pretrained(config)  # already there: nothing to download
    check_pretrained(config)
    run_checks(config, RunFiles(config))
    build_model([16], backbone="resnet18", norm_act="abn", pretrained="torchvision")


def test_torchvision_weights_offline_and_not_cached_fail_early(tmp_path, torch_hub, monkeypatch):
    _offline(monkeypatch)
    config = _torchvision_config(tmp_path)
    with pytest.raises(SetupError) as error:
        run_checks(config, RunFiles(config))
    message = str(error.value)
    assert f"are not in the torch hub cache, {_resnet18_cache_file(torch_hub)}, and downloading them failed" in message
    assert "Network is unreachable" in message and RESNET18_URL in message
    assert "--pretrained <path>" in message and "--no_pretrained" in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()  # rank 0 removed the folders it created
    with pytest.raises(SetupError, match=re.escape(str(_resnet18_cache_file(torch_hub)))):
        check_pretrained(config)  # not fetched: nothing to read either
    for later in (config.replace(steps=(1,)), config.replace(test=True)):  # no step-0 model trained
        fetch_pretrained(later)
        check_pretrained(later)


def test_truncated_cached_torchvision_weights_fail_early(tmp_path, torch_hub):
    path = _resnet18_cache_file(torch_hub)
    _save_resnet18_weights(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    config = _torchvision_config(tmp_path)
    with pytest.raises(SetupError) as error:
        run_checks(config, RunFiles(config))  # no download either: the file is there
    message = str(error.value)
    assert f"--pretrained torchvision: the cached file {path}: cannot be read as a weights file" in message
    assert "delete it" in message


@pytest.mark.parametrize("cached", [True, False])
def test_other_ranks_read_the_cache_after_rank_0_fetched(tmp_path, torch_hub, monkeypatch, cached):
    """Rank 1 of 2 (simulated): it downloads nothing and reads the cache only after the gather that
    waits for rank 0's download."""
    if cached:
        _save_resnet18_weights(_resnet18_cache_file(torch_hub))
    events = []
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj, what: events.append(what) or [None, obj])
    monkeypatch.setattr(checks, "fetch_pretrained", lambda config: events.append("fetch"))
    original_check = checks.check_pretrained
    monkeypatch.setattr(checks, "check_pretrained", lambda config: events.append("check") or original_check(config))
    config = _torchvision_config(tmp_path)
    if cached:
        run_checks(config, RunFiles(config))
        assert len(events) == 3 and events[1] == "check"
    else:
        with pytest.raises(SetupError) as error:
            run_checks(config, RunFiles(config))
        message = str(error.value)
        assert str(_resnet18_cache_file(torch_hub)) in message and "TORCH_HOME" in message
        assert "although rank 0 put them in its cache" in message and message.endswith("(on rank 1)")
    assert "rank 0 may be downloading" in events[0] and "fetch" not in events


def test_train_offline_with_torchvision_weights_exits_before_training(tmp_path, monkeypatch):
    """train.py with an empty torch hub cache and no network (a proxy that refuses connections)."""
    unreachable = "http://127.0.0.1:9"
    for name, value in {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": unreachable, "HTTPS_PROXY": unreachable,
                        "no_proxy": "", "NO_PROXY": ""}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(urllib.request, "_opener", None)  # the next opener reads the proxy variables
    result = run_train_in_process(train_args(str(tmp_path / "data"), tmp_path, "--pretrained", "torchvision"),
                                  check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    cache_file = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_URL.rsplit("/", 1)[1]
    assert f"are not in the torch hub cache, {cache_file}, and downloading them failed" in output
    assert "Connection refused" in output and "--no_pretrained" in output
    assert not cache_file.exists() and not (tmp_path / "checkpoints").exists()
