"""evaluate_model / predict with stand-in detectors (same contract as fewsight's detectors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewsight.errors import InvalidArgumentError
from fewsight.eval import evaluate_model, predict

TARGETS = [
    {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([0])},
    {"boxes": torch.tensor([[2.0, 3.0, 12.0, 14.0], [0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1, 0])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]
DATASET = [(torch.full((3, 16, 16), (i + 1) / 10), t) for i, t in enumerate(TARGETS)]


class Oracle(nn.Module):
    """Returns the ground truth of each image (recognised by its constant value): mAP 1."""

    classes = ["a", "b"]

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls: list[bool] = []

    def forward(self, images):
        self.calls.append(self.training)
        out = []
        for im in images:
            t = TARGETS[round(float(im.mean()) * 10) - 1]
            out.append({"boxes": t["boxes"].to(im), "scores": torch.ones(len(t["labels"])), "labels": t["labels"]})
        return out


def test_oracle_scores_one_and_mode_is_restored():
    model = Oracle().train()
    metrics, preds = evaluate_model(model, DATASET, batch_size=2, progress=False, return_predictions=True)
    assert metrics["map"] == 1.0 and metrics["map50"] == 1.0 and metrics["num_images"] == 3
    assert set(metrics["per_class"]) == {"a", "b"}  # names from model.classes
    assert metrics["seconds"] > 0 and metrics["images_per_second"] > 0
    assert model.training and model.calls == [False, False]  # eval mode inside, train mode after
    assert len(preds) == 3 and all(p["boxes"].device.type == "cpu" for p in preds)


def test_pr_curves_and_class_names_argument():
    metrics = evaluate_model(Oracle(), DATASET, 3, progress=False, pr_curves=True, class_names=["x", "y"])
    assert set(metrics["per_class"]) == {"x", "y"}
    curves = metrics["pr_curves"]
    assert set(curves["precision"]) == {"x", "y"} and torch.all(curves["precision"]["x"] == 1.0)


def test_predict_batches_and_validates():
    model = Oracle()
    images = [im for im, _ in DATASET]
    preds = predict(model, images, batch_size=2, progress=False)
    assert [len(p["labels"]) for p in preds] == [1, 2, 0]
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        predict(model, images, batch_size=0, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_images_follow_the_model_device():
    model = Oracle().cuda()
    metrics = evaluate_model(model, DATASET, 2, progress=False)
    assert metrics["map"] == 1.0
