"""Pieces of the pre-training checks: option comparison, original checkpoints, cleanup."""

import pytest
import torch

from segmentation.engine.original_checkpoint import adapt_checkpoint, convert_original_checkpoint, head_widths
from segmentation.engine.options import parse_options
from option_helpers import method_options
from segmentation.engine.preflight import (Preflight, UsageError, _files_of_steps, differing_options,
                                           remove_created, stored_options)
from segmentation.methods import active_methods
from segmentation.methods.weight_penalty import nesterov_stability_limit
from segmentation.models import build_model

BASE = {"lr": 0.01, "incremental_lr": 0.001, "loss_kd": 10.0, "num_workers": 2, "pretrained": "w.pth",
        "name": "exp", "steps": [0, 1]}


def test_differing_options_compares_what_changes_the_result_of_the_step():
    assert differing_options(BASE, dict(BASE, num_workers=8, steps=[1], name="x"), 1) == []
    assert differing_options(BASE, dict(BASE, loss_kd=100.0), 1) == ["--loss_kd 10.0 -> 100.0"]
    # The learning rate of the step counts: --step 1 --lr 0.001 equals --step all --lr 0.01 --incremental_lr 0.001.
    assert differing_options(BASE, dict(BASE, lr=0.001, incremental_lr=None), 1) == []
    assert differing_options(BASE, dict(BASE, lr=0.001, incremental_lr=None), 0) == [
        "learning rate of step 0 0.01 -> 0.001"]
    # ImageNet weights only matter at step 0; options one side does not know are left out.
    assert differing_options(BASE, dict(BASE, pretrained=None), 1) == []
    assert differing_options(BASE, dict(BASE, pretrained=None), 0) == ["--pretrained w.pth -> None"]
    assert differing_options(BASE, dict(BASE, new_option=True), 0) == []
    # A step-0 model does not depend on the options that act from step 1 on, nor on the method's name.
    assert differing_options(BASE, dict(BASE, loss_kd=100.0, method="MiB", task="15-1"), 0) == []
    assert differing_options(BASE, dict(BASE, weight_decay=0.001, method="MiB"), 0) == []  # unknown to BASE
    assert differing_options(dict(BASE, weight_decay=0.0001), dict(BASE, weight_decay=0.001, method="MiB"), 0) == [
        "--weight_decay 0.0001 -> 0.001"]


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


def test_remove_created_keeps_folders_with_finished_files(tmp_path):
    kept, removed = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for folder in (kept, removed):
        (folder / "step0").mkdir(parents=True)
        (folder / "step0" / "events.out").write_text("x")
    (kept / "step0.json").write_text("{}")
    remove_created([tmp_path / "a", kept, tmp_path / "b", removed])
    assert (kept / "step0.json").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("norm_act, batch_size, world_size, refused", [
    ("iabn_sync", 1, 1, True),   # one image in all
    ("iabn_sync", 1, 2, False),  # one image per process, two in the synchronised batch
    ("iabn", 1, 2, True),        # unsynchronised: each process normalises over one image
    ("abn", 2, 1, False),
])
def test_batch_size_against_normalisation(norm_act, batch_size, world_size, refused, tmp_path):
    opts = method_options(backbone="resnet18", test=False, norm_act=norm_act, batch_size=batch_size)
    preflight = Preflight(opts, tmp_path, tmp_path)
    if refused:
        with pytest.raises(UsageError, match="--batch_size 1"):
            preflight.check_options(world_size)
    else:
        preflight.check_options(world_size)
    opts.test = True  # testing has no training batch
    preflight.check_options(world_size)


def test_stored_options_of_a_half_finished_step(tmp_path):
    checkpoints, logs = tmp_path / "ck", tmp_path / "logs"
    checkpoints.mkdir()
    assert stored_options(checkpoints, logs, 0) is None
    torch.save({"options": dict(BASE, loss_kd=1.0)}, checkpoints / "step0-iter4.pth")
    torch.save({"options": dict(BASE, loss_kd=2.0)}, checkpoints / "step0-iter8.pth")
    assert stored_options(checkpoints, logs, 0)["loss_kd"] == 2.0  # the newest in-step checkpoint
    torch.save({"options": dict(BASE, loss_kd=3.0)}, checkpoints / "step0.pth")
    assert stored_options(checkpoints, logs, 0)["loss_kd"] == 3.0  # the step-final one first


def test_overwrite_removes_the_files_of_the_replaced_steps_only(tmp_path):
    checkpoints, logs = tmp_path / "ck", tmp_path / "logs"
    kept = [checkpoints / "step0.pth", logs / "step0.json", logs / "step0" / "events.out.tfevents.1.host",
            logs / "test" / "events.out.tfevents.1.host.a.b.step0", logs / "train.log"]
    replaced = [checkpoints / "step1.pth", checkpoints / "step1-iter4.pth", checkpoints / "step2.pth.corrupt",
                logs / "step1.json", logs / "eval-step1.json", logs / "step1",
                logs / "test" / "events.out.tfevents.2.host.a.b.step1", logs / "eval" / "events.out.tfevents.3.host.step2"]
    for path in kept + replaced:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name != "step1":
            path.write_text("")
    (logs / "step1").mkdir(exist_ok=True)
    assert sorted(_files_of_steps(checkpoints, logs, 1)) == sorted(replaced)


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


def _train_options(*argv):
    return parse_options(["--dataset", "synthetic", "--task", "15-5", *argv])


def unstable_penalty_warning(opts):
    """The launch warnings of the active methods (at most one here), or None."""
    warnings = [warning for method in active_methods(opts) for warning in method.launch_warnings(opts)]
    assert len(warnings) <= 1
    return warnings[0] if warnings else None


def test_unstable_penalty_is_warned_about_with_the_learning_rate_that_works():
    # EWC and PI: 500 x importance <= 1, curvature 1000; limit 1.357 at momentum 0.9.
    warning = unstable_penalty_warning(_train_options("--method", "EWC", "--step", "all", "--lr", "0.01",
                                                      "--incremental_lr", "0.002"))
    assert "ewc penalty is unstable at step 1" in warning and "below 0.00136" in warning
    for safe in (["--step", "all", "--lr", "0.01", "--incremental_lr", "0.001"],  # the protocol
                 ["--step", "0", "--lr", "0.01"],  # no penalty at step 0
                 ["--step", "1", "--lr", "0.002", "--reg_no_normalize"]):  # importances unbounded: no claim
        assert unstable_penalty_warning(_train_options("--method", "PI", *safe)) is None, safe
    # RW: 100 x (Fisher + score) <= 200, curvature 400.
    assert unstable_penalty_warning(_train_options("--method", "RW", "--step", "1", "--lr", "0.003")) is None
    assert "below 0.00339" in unstable_penalty_warning(_train_options("--method", "RW", "--step", "1", "--lr", "0.004"))
    assert unstable_penalty_warning(_train_options("--method", "MiB", "--step", "1", "--lr", "1")) is None
