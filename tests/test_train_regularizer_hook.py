"""The Trainer's gradient hooks, run by EWC, PI and RW: importance from unscaled gradients,
penalty gradient added before the optimizer step, fp16 overflow iterations left out of the
importance."""
import pytest
import torch

from option_helpers import synthetic_config
from segmentation.engine.optim import build_optimizer, build_scheduler
from segmentation.engine.sampler import GlobalBatchSampler
from segmentation.engine.trainer import Trainer
from segmentation.methods.step_methods import StepStart, step_methods
from test_train_trainer import AugmentedSet, TinySegmenter, _opts


def _trainer(amp, previous=None, reference=None, estimate=(), previous_states=None):
    """A trainer whose step runs EWC (weight 2), penalising when ``previous`` (EWC's step t-1 state)
    and ``reference`` (the step t-1 weights) are given, and estimating the ``estimate`` ones."""
    torch.manual_seed(0)
    model = TinySegmenter()
    dataset = AugmentedSet()
    sampler = GlobalBatchSampler(len(dataset), 3, 0, 1, seed=5)
    optimizer = build_optimizer(model, _opts())
    scheduler = build_scheduler(optimizer, _opts(), len(sampler))
    step = 0 if previous is None else 1
    opts = synthetic_config(regularizer="ewc", reg_importance=2.0, estimate_importance=list(estimate))
    methods = step_methods(opts, step, num_old_channels=0, num_channels=16)
    checkpoint = None
    if previous is not None:
        checkpoint = {"model_state": reference, "method_states": {"ewc": previous, **(previous_states or {})}}
    methods.begin_step(StepStart(model=model, old_model=None, previous=checkpoint, previous_path="step0.pth",
                                 train_set=dataset, device=torch.device("cpu")))
    trainer = Trainer(model, None, methods, optimizer, scheduler, dataset, sampler,
                      device=torch.device("cpu"), epochs=1, amp=amp)
    return trainer, model, {method.regularizer: method.estimate for method in methods.methods}


def _set_gradients(model, gradients, scale):
    for parameter, gradient in zip(model.parameters(), gradients):
        parameter.grad = gradient * scale


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_importance_sees_unscaled_gradients(amp):
    trainer, model, estimates = _trainer(amp)
    ewc = estimates["ewc"]
    scale = trainer.scaler.scale(torch.tensor(1.0)).item()  # 65536 under fp16, 1 otherwise
    assert (scale > 1) == (amp == "fp16")
    gradients = [torch.randn_like(p) for p in model.parameters()]
    _set_gradients(model, gradients, scale)
    components = {"loss": torch.tensor(1.0)}
    trainer._gradient_hooks(components)
    for (name, _), gradient in zip(model.named_parameters(), gradients):
        assert torch.allclose(ewc.fisher[name], 0.9 * gradient ** 2 + 0.1, rtol=1e-6), name
    assert "loss_reg" not in components  # step 0: no penalty


def test_fp16_overflow_leaves_the_importance_unchanged():
    trainer, model, estimates = _trainer("fp16")
    ewc = estimates["ewc"]
    trainer.scaler.scale(torch.tensor(1.0))
    gradients = [torch.randn_like(p) for p in model.parameters()]
    gradients[0][0] = float("inf")
    _set_gradients(model, gradients, 1.0)
    trainer._gradient_hooks({"loss": torch.tensor(1.0)})
    assert all(torch.equal(value, torch.ones_like(value)) for value in ewc.fisher.values())


def test_penalty_gradient_is_added_before_the_optimizer_step():
    model = TinySegmenter()
    previous = {"name": "ewc", "fisher": {name: torch.rand_like(p) for name, p in model.named_parameters()}}
    reference = {name: p.detach() + 0.5 for name, p in model.named_parameters()}
    trainer, model, estimates = _trainer("off", previous, reference)
    ewc = estimates["ewc"]
    gradients = [torch.randn_like(p) for p in model.parameters()]
    _set_gradients(model, gradients, 1.0)
    components = {"loss": torch.tensor(1.0)}
    trainer._gradient_hooks(components)
    penalty = 0.0
    for (name, parameter), gradient in zip(model.named_parameters(), gradients):
        importance = ewc.penalty_importance[name]
        difference = parameter.detach() - reference[name]
        assert torch.allclose(parameter.grad, gradient + 2 * 2.0 * importance * difference), name
        penalty += 2.0 * float((importance * difference ** 2).sum())
    assert components["loss_reg"].item() == pytest.approx(penalty, rel=1e-5)
    assert components["loss"].item() == pytest.approx(1.0 + penalty, rel=1e-5)


def test_estimating_regularizers_see_the_loss_gradients_and_add_no_penalty():
    # EWC penalises; RW (--estimate_importance rw) only estimates. Both update before any penalty
    # is added, so RW's Fisher is from the loss gradients.
    model = TinySegmenter()
    names = [name for name, _ in model.named_parameters()]
    previous = {"name": "ewc", "fisher": {name: torch.rand_like(p) for name, p in model.named_parameters()}}
    reference = {name: p.detach() + 0.5 for name, p in model.named_parameters()}
    rw_previous = {"name": "rw", "fisher": {name: torch.full_like(p, 2.0) for name, p in model.named_parameters()},
                   "score": {name: torch.ones_like(p) for name, p in model.named_parameters()}}
    trainer, model, estimates = _trainer("off", previous, reference, estimate=["rw"],
                                         previous_states={"rw": rw_previous})
    ewc, rw = estimates["ewc"], estimates["rw"]
    assert ewc.penalizes and not rw.penalizes
    gradients = [torch.randn_like(p) for p in model.parameters()]
    _set_gradients(model, gradients, 1.0)
    components = {"loss": torch.tensor(1.0)}
    trainer._gradient_hooks(components)
    penalty = 0.0
    for name, parameter, gradient in zip(names, model.parameters(), gradients):
        assert torch.allclose(rw.fisher[name], 0.9 * gradient ** 2 + 0.1 * 2.0, rtol=1e-6), name
        difference = parameter.detach() - reference[name]
        penalty += 2.0 * float((ewc.penalty_importance[name] * difference ** 2).sum())
    assert components["loss_reg"].item() == pytest.approx(penalty, rel=1e-5)
    assert rw.step_state()["score"][names[0]].allclose(0.5 * rw_previous["score"][names[0]])


def test_fp16_gradient_check_waits_for_the_device_once_per_iteration(monkeypatch):
    # The finite-gradient check under fp16 is one fused norm read once, not one read per parameter
    # (each read is a host synchronisation on a GPU). Here the model has 4 parameters.
    trainer, model, _ = _trainer("fp16")
    trainer.scaler.scale(torch.tensor(1.0))
    _set_gradients(model, [torch.randn_like(p) for p in model.parameters()], 1.0)
    assert len([p for p in model.parameters() if p.grad is not None]) > 1
    reads = []
    tensor_bool = torch.Tensor.__bool__

    def counted_bool(tensor):
        reads.append(tensor.numel())
        return tensor_bool(tensor)

    monkeypatch.setattr(torch.Tensor, "__bool__", counted_bool)
    monkeypatch.setattr(torch.Tensor, "item", lambda tensor: reads.append(1) or tensor.tolist())
    trainer._gradient_hooks({"loss": torch.tensor(1.0)})
    assert reads == [1]
