"""Trainer: LR schedule, --fix_bn persistence, optimizer groups, exact stop-and-resume (in process)."""
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from option_helpers import synthetic_config
from segmentation.engine.checkpoint import InStepCheckpoints
from segmentation.engine.optim import build_optimizer, build_scheduler
from segmentation.engine.sampler import GlobalBatchSampler
from segmentation.engine.trainer import Trainer, TrainingInterrupted
from segmentation.signals import StopSignal
from segmentation.methods.step_methods import step_methods
from segmentation.models.norm import ABN


def cross_entropy_step():
    """The methods of a step 0 without any method option: plain cross-entropy."""
    return step_methods(synthetic_config(), 0, num_old_channels=0, num_channels=16)


class TinySegmenter(nn.Module):
    """body/head/cls like the real model, with dropout so that the global RNG matters."""

    def __init__(self, classes=(3,)):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), ABN(4))
        self.head = nn.Dropout2d(0.3)
        self.cls = nn.ModuleList(nn.Conv2d(4, n, 1) for n in classes)

    def forward(self, x, features=()):
        body = self.body(x)
        logits = torch.cat([c(self.head(body)) for c in self.cls], dim=1)
        return (logits, {"body": body}) if features else logits

    def fix_bn(self):
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)


class AugmentedSet(torch.utils.data.Dataset):
    """Per-sample augmentation seeded by (index, epoch), like the data layer."""

    def __init__(self, n=10):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(n, 3, 8, 8, generator=generator)
        self.labels = torch.randint(0, 3, (n, 8, 8), generator=generator)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index * 1000 + self.epoch)
        noise = 0.1 * torch.randn(3, 8, 8, generator=generator)
        return self.images[index] + noise, self.labels[index]


def _opts(**overrides):
    values = dict(lr=0.1, incremental_lr=None, momentum=0.9, weight_decay=1e-4, freeze=False, lr_policy="poly", lr_power=0.9,
                  lr_decay_step=3, lr_decay_factor=0.5)
    values.update(overrides)
    return synthetic_config(**values)


def _trainer(tmp_path, epochs=2, stop_after=None, fix_bn=False, on_epoch_end=None, ckpt_interval=0, amp="off"):
    torch.manual_seed(0)
    model = TinySegmenter()
    if fix_bn:
        model.fix_bn()
    dataset = AugmentedSet()
    sampler = GlobalBatchSampler(len(dataset), 3, 0, 1, seed=5)
    optimizer = build_optimizer(model, _opts())
    scheduler = build_scheduler(optimizer, _opts(), len(sampler) * epochs)
    stop = StopSignal()
    trainer = Trainer(
        model, None, cross_entropy_step(), optimizer, scheduler, dataset, sampler,
        device=torch.device("cpu"), epochs=epochs, seed=5, fix_bn=fix_bn, amp=amp,
        checkpoints=InStepCheckpoints(tmp_path, 0), ckpt_interval=ckpt_interval,
        checkpoint_meta={"dataset": "d", "task": "t", "step": 0, "classes": [3]},
        on_epoch_end=on_epoch_end, stop_signal=stop,
    )
    if stop_after is not None:
        original = trainer.run_step

        def run_step(images, labels):
            components = original(images, labels)
            if trainer.iteration + 1 == stop_after:
                stop.received = signal.SIGTERM
            return components

        trainer.run_step = run_step
    return trainer, model


def test_poly_schedule_per_iteration():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.01)
    scheduler = build_scheduler(optimizer, _opts(), total_iterations=10)
    for k in range(10):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - k / 10) ** 0.9)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_step_schedule_per_iteration():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, _opts(lr_policy="step"), total_iterations=10)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_optimizer_groups_nesterov_and_freeze():
    model = TinySegmenter(classes=(3, 2))
    optimizer = build_optimizer(model, _opts())
    assert [g["name"] for g in optimizer.param_groups] == ["body", "classifiers"]  # the head has no parameters
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 for g in optimizer.param_groups)
    frozen = build_optimizer(model, _opts(freeze=True))
    trained = {id(p) for g in frozen.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.cls.parameters()}


def test_incremental_lr_applies_after_step_0_only():
    model = TinySegmenter(classes=(3, 2))
    opts = _opts(lr=0.01, incremental_lr=0.001)
    assert {g["lr"] for g in build_optimizer(model, opts, step=0).param_groups} == {0.01}
    assert {g["lr"] for g in build_optimizer(model, opts, step=1).param_groups} == {0.001}
    assert {g["lr"] for g in build_optimizer(model, _opts(lr=0.01), step=2).param_groups} == {0.01}


def test_fix_bn_keeps_norm_layers_in_eval_mode_across_epochs(tmp_path):
    modes = []

    def validate(epoch):
        model.eval()  # validation switches everything to eval, the trainer must restore train mode

    trainer, model = _trainer(tmp_path, fix_bn=True, on_epoch_end=validate)
    norm = model.body[1]
    norm.register_forward_pre_hook(lambda module, inputs: modes.append((module.training, model.training)))
    running_mean = norm.running_mean.clone()
    trainer.train()
    assert modes and all(not norm_training and model_training for norm_training, model_training in modes)
    assert torch.equal(norm.running_mean, running_mean)
    assert not norm.weight.requires_grad


@pytest.mark.parametrize("amp", ["off", "fp16"])  # fp16: the GradScaler state is resumed too
def test_stop_signal_writes_checkpoint_and_resume_is_exact(tmp_path, amp):
    reference, reference_model = _trainer(tmp_path / "reference", amp=amp)
    reference.train()
    reference_rng = torch.get_rng_state()  # dropout draws advance it

    stopped, _ = _trainer(tmp_path / "run", stop_after=4, amp=amp)  # mid-epoch (3 iterations per epoch)
    with pytest.raises(TrainingInterrupted):
        stopped.train()
    checkpoints = InStepCheckpoints(tmp_path / "run", 0)
    assert [p.name for p in checkpoints.paths()] == ["step0-iter3.pth", "step0-iter4.pth"]

    resumed, resumed_model = _trainer(tmp_path / "run", amp=amp)
    resumed.resume(checkpoints.latest())
    assert (resumed.epoch, resumed.batch_in_epoch, resumed.iteration) == (1, 1, 4)
    if amp == "fp16":  # scale and growth tracker (successful steps so far) continue
        assert resumed.scaler.state_dict() == stopped.scaler.state_dict()
        assert resumed.scaler.state_dict()["_growth_tracker"] == 4
    resumed.train()
    for key, value in reference_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert torch.equal(torch.get_rng_state(), reference_rng)


def test_resume_from_epoch_end_checkpoint_starts_next_epoch(tmp_path):
    trainer, _ = _trainer(tmp_path, stop_after=3)  # the stop lands on the last batch of epoch 0
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    resumed, _ = _trainer(tmp_path)
    resumed.resume(InStepCheckpoints(tmp_path, 0).latest())
    assert (resumed.epoch, resumed.batch_in_epoch, resumed.iteration) == (1, 0, 3)


def test_resume_of_an_in_step_checkpoint_of_another_number_of_processes_takes_rank_0s_rng_state(tmp_path):
    trainer, _ = _trainer(tmp_path)
    state = trainer.state_dict()
    torch.manual_seed(5)
    rank0, rank1 = state["rng_states"][0], dict(state["rng_states"][0], torch=torch.get_rng_state())
    state["rng_states"] = [rank0, rank1]  # as 2 processes wrote it
    torch.manual_seed(6)
    assert trainer.resume(state) == 2  # the number of processes that wrote it, for the log
    assert torch.equal(torch.get_rng_state(), rank0["torch"])
    assert trainer.iteration == state["iteration"]


def test_ce_loss_decreases_on_fixed_data(tmp_path):
    trainer, model = _trainer(tmp_path, epochs=6)
    dataset = trainer.train_set
    model.eval()
    before = F.cross_entropy(model(dataset.images), dataset.labels).item()
    trainer.train()
    model.eval()
    after = F.cross_entropy(model(dataset.images), dataset.labels).item()
    assert after < before


def test_freeze_leaves_the_body_without_gradients(tmp_path):
    # --freeze: the body is out of the optimizer, and no gradient is computed for it at all (one
    # that were would be all-reduced every iteration and, never cleared, grow without bound).
    from segmentation.engine.run import StepRunner
    from segmentation.engine.run_files import RunFiles

    config = synthetic_config("--backbone", "resnet18", "--freeze", "--no_pretrained", "--checkpoint_dir",
                              str(tmp_path / "checkpoints"), "--logdir", str(tmp_path / "logs"))
    runner = StepRunner(config, 0, torch.device("cpu"), RunFiles(config))
    methods = step_methods(config, 0, num_old_channels=0, num_channels=runner.num_channels)
    model, _, _ = runner._build_models(methods)
    optimizer = build_optimizer(model, config)
    sampler = GlobalBatchSampler(4, 2, 0, 1, seed=0)
    trainer = Trainer(model, None, methods, optimizer, build_scheduler(optimizer, config, 10), [], sampler,
                      device=torch.device("cpu"), epochs=1)
    trainer.train_mode()
    body_before = {name: value.clone() for name, value in model.body.state_dict().items()}
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, runner.num_channels, (2, 32, 32))
    for _ in range(2):
        trainer.run_step(images, labels)
    assert all(parameter.grad is None for parameter in model.body.parameters())
    assert all(parameter.grad is not None for parameter in model.cls.parameters())
    body_after = model.body.state_dict()
    weights = [name for name in body_before if name.endswith(("weight", "bias"))]
    assert all(torch.equal(body_before[name], body_after[name]) for name in weights)
    # Training mode still updates the norm layers' running statistics, as in the original.
    assert not all(torch.equal(body_before[name], body_after[name]) for name in body_before if "running" in name)
