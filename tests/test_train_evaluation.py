"""evaluate(): confusion matrix of argmax predictions, scores and old/new groups, sample hook."""
import pytest
import torch
import torch.nn as nn

from segmentation.engine.evaluation import build_eval_loader, evaluate


class FixedLogits(nn.Module):
    """Returns stored logits for the images it is given (images carry their index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits[images[:, 0, 0, 0].long()]


def test_evaluate_matches_a_direct_count():
    generator = torch.Generator().manual_seed(0)
    n, classes = 5, 4
    logits = torch.randn(n, classes, 3, 3, generator=generator)
    labels = torch.randint(0, classes, (n, 3, 3), generator=generator)
    labels[0, 0] = 255
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 3, 3).contiguous()
    dataset = list(zip(images, labels))
    seen = []
    loader = build_eval_loader(dataset, batch_size=2, num_workers=0, device=torch.device("cpu"))
    scores = evaluate(FixedLogits(logits), loader, classes, torch.device("cpu"), num_old_channels=2,
                      on_batch=lambda index, x, y, pred: seen.append(len(x)))
    assert seen == [2, 2, 1]  # every sample once, the last batch not padded

    predictions = logits.argmax(1)
    valid = labels != 255
    expected_iou = []
    for c in range(classes):
        intersection = ((predictions == c) & (labels == c) & valid).sum().item()
        union = (((predictions == c) | (labels == c)) & valid).sum().item()
        expected_iou.append(intersection / union if (labels == c).any() else None)
    assert scores["class_iou"] == pytest.approx(expected_iou)
    assert scores["overall_acc"] == pytest.approx(((predictions == labels) & valid).sum().item() / valid.sum().item())
    assert scores["miou_old"] == pytest.approx(sum(expected_iou[:2]) / 2)
    assert scores["miou_new_fg"] == pytest.approx(sum(expected_iou[2:]) / 2)
    assert scores["confusion_matrix"].sum().item() == valid.sum().item()


def test_unknown_amp_mode_is_rejected():
    loader = build_eval_loader([(torch.zeros(3, 2, 2), torch.zeros(2, 2, dtype=torch.long))], 1, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="amp"):
        evaluate(FixedLogits(torch.zeros(1, 2, 2, 2)), loader, 2, torch.device("cpu"), amp="fp8")
