"""The Trainer's regularizer hook: importance from unscaled gradients, penalty gradient added before
the optimizer step, fp16 overflow iterations left out of the importance."""
import pytest
import torch

from segmentation.engine.methods import MethodLoss
from segmentation.engine.sampler import GlobalBatchSampler
from segmentation.engine.trainer import Trainer, build_optimizer, build_scheduler
from segmentation.methods.regularizer import EWC, RW
from test_train_trainer import AugmentedSet, TinySegmenter, _opts


def _trainer(amp, previous=None, reference=None):
    torch.manual_seed(0)
    model = TinySegmenter()
    dataset = AugmentedSet()
    sampler = GlobalBatchSampler(len(dataset), 3, 0, 1, seed=5)
    optimizer = build_optimizer(model, _opts())
    scheduler = build_scheduler(optimizer, _opts(), len(sampler))
    regularizer = EWC(model, previous, reference, weight=2.0, alpha=0.9)
    trainer = Trainer(model, None, MethodLoss(num_old_channels=0), optimizer, scheduler, dataset, sampler,
                      device=torch.device("cpu"), epochs=1, amp=amp, regularizers=[regularizer])
    return trainer, model, regularizer


def _set_gradients(model, gradients, scale):
    for parameter, gradient in zip(model.parameters(), gradients):
        parameter.grad = gradient * scale


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_importance_sees_unscaled_gradients(amp):
    trainer, model, ewc = _trainer(amp)
    scale = trainer.scaler.scale(torch.tensor(1.0)).item()  # 65536 under fp16, 1 otherwise
    assert (scale > 1) == (amp == "fp16")
    gradients = [torch.randn_like(p) for p in model.parameters()]
    _set_gradients(model, gradients, scale)
    components = {"loss": torch.tensor(1.0)}
    trainer._regularize(components)
    for (name, _), gradient in zip(model.named_parameters(), gradients):
        assert torch.allclose(ewc.fisher[name], 0.9 * gradient ** 2 + 0.1, rtol=1e-6), name
    assert "loss_reg" not in components  # step 0: no penalty


def test_fp16_overflow_leaves_the_importance_unchanged():
    trainer, model, ewc = _trainer("fp16")
    trainer.scaler.scale(torch.tensor(1.0))
    gradients = [torch.randn_like(p) for p in model.parameters()]
    gradients[0][0] = float("inf")
    _set_gradients(model, gradients, 1.0)
    trainer._regularize({"loss": torch.tensor(1.0)})
    assert all(torch.equal(value, torch.ones_like(value)) for value in ewc.fisher.values())


def test_penalty_gradient_is_added_before_the_optimizer_step():
    model = TinySegmenter()
    previous = {"name": "ewc", "fisher": {name: torch.rand_like(p) for name, p in model.named_parameters()}}
    reference = {name: p.detach() + 0.5 for name, p in model.named_parameters()}
    trainer, model, ewc = _trainer("off", previous, reference)
    gradients = [torch.randn_like(p) for p in model.parameters()]
    _set_gradients(model, gradients, 1.0)
    components = {"loss": torch.tensor(1.0)}
    trainer._regularize(components)
    penalty = 0.0
    for (name, parameter), gradient in zip(model.named_parameters(), gradients):
        importance = ewc.penalty_importance[name]
        difference = parameter.detach() - reference[name]
        assert torch.allclose(parameter.grad, gradient + 2 * 2.0 * importance * difference), name
        penalty += 2.0 * float((importance * difference ** 2).sum())
    assert components["loss_reg"].item() == pytest.approx(penalty, rel=1e-5)
    assert components["loss"].item() == pytest.approx(1.0 + penalty, rel=1e-5)


def test_estimating_regularizers_see_the_loss_gradients_and_add_no_penalty():
    # EWC penalises; an RW built with its previous state but without the previous weights only
    # estimates. Both update before any penalty is added, so RW's Fisher is from the loss gradients.
    model = TinySegmenter()
    names = [name for name, _ in model.named_parameters()]
    previous = {"name": "ewc", "fisher": {name: torch.rand_like(p) for name, p in model.named_parameters()}}
    reference = {name: p.detach() + 0.5 for name, p in model.named_parameters()}
    rw_previous = {"name": "rw", "fisher": {name: torch.full_like(p, 2.0) for name, p in model.named_parameters()},
                   "score": {name: torch.ones_like(p) for name, p in model.named_parameters()}}
    trainer, model, ewc = _trainer("off", previous, reference)
    rw = RW(model, rw_previous, None, weight=100.0, alpha=0.9, iterations=10)
    assert not rw.penalizes
    trainer.regularizers.append(rw)
    gradients = [torch.randn_like(p) for p in model.parameters()]
    _set_gradients(model, gradients, 1.0)
    components = {"loss": torch.tensor(1.0)}
    trainer._regularize(components)
    penalty = 0.0
    for name, parameter, gradient in zip(names, model.parameters(), gradients):
        assert torch.allclose(rw.fisher[name], 0.9 * gradient ** 2 + 0.1 * 2.0, rtol=1e-6), name
        difference = parameter.detach() - reference[name]
        penalty += 2.0 * float((ewc.penalty_importance[name] * difference ** 2).sum())
    assert components["loss_reg"].item() == pytest.approx(penalty, rel=1e-5)
    assert rw.step_state()["score"][names[0]].allclose(0.5 * rw_previous["score"][names[0]])
