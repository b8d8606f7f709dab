"""Few-shot fine-tuning: a few steps of the detector's own loss on a balanced k-shot set (TFA, Wang et al. 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError
from fewsight.eval import model_device

__all__ = ["finetune"]


def finetune(
    model: nn.Module,
    images: Sequence[Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    *,
    steps: int = 50,
    lr: float = 1e-4,
    batch_size: int = 8,
    trainable: str = "head",
    seed: int = 0,
) -> list[float]:
    """A few AdamW steps of the detector's own loss on a (balanced) support set; returns the loss per step.

    ``trainable="head"`` trains the head and the class parameters (directions when learned, ``w``, ``b``)
    with the backbone and FPN frozen (the few-shot fine-tuning of TFA); ``"all"`` trains everything.
    Normalisation layers stay in eval mode (a handful of images must not move BatchNorm statistics) and
    DLDENet's tracked means are not updated. Labels index the model's classes (``-1``: unknown box, ignored).
    """
    if trainable not in ("head", "all"):
        raise InvalidArgumentError(f"trainable: expected 'head' or 'all', got {trainable!r}")
    if steps < 0:
        raise InvalidArgumentError(f"steps: expected an int >= 0, got {steps!r}")
    if steps == 0 or not images:
        return []
    device = model_device(model)
    frozen = () if trainable == "all" else tuple(m for m in (getattr(model, "backbone", None),) if m is not None)
    frozen_params = {id(p) for m in frozen for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen_params]
    restore_grad = [p for m in frozen for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    # Tracked means stay where enrollment put them: an EMA over a handful of images chasing a head that
    # Adam is moving makes the loss climb again after a few steps.
    means_update = getattr(model, "means_update", None)
    if means_update is not None:
        model.means_update = "none"
    for p in restore_grad:  # no backward through the frozen part
        p.requires_grad_(False)
    model.train()
    for m in model.modules():  # frozen statistics
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) or m in frozen:
            m.eval()
    losses: list[float] = []
    try:
        for _ in range(steps):
            pick = torch.randperm(len(images), generator=gen)[:batch_size].tolist()
            batch = [images[i].to(device) for i in pick]
            batch_targets = [{key: v.to(device) for key, v in targets[i].items()} for i in pick]
            loss_dict = model(batch, batch_targets)
            loss = sum(loss_dict.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
        for p in restore_grad:
            p.requires_grad_(True)
        if means_update is not None:
            model.means_update = means_update
    return losses
