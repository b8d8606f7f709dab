"""Benchmark the dense-detector losses against the usual per-image-loop implementations.

1. ``fewsight.losses.multibox_loss`` vs a super-gradients-style ``SSDLoss`` (written below: a Python
   loop over images for matching, then double-sort hard-negative mining), SSD300 (8732 default
   boxes), batch 32, 21 logits (20 classes + background), ~5 GT per image.
2. ``fewsight.losses.focal_loss_detection`` vs ``torchvision.ops.sigmoid_focal_loss`` applied the
   way torchvision's RetinaNet head does (a loop over images building one-hot targets and dropping
   ignored anchors), RetinaNet anchors for a 512x512 input (49104 anchors), 80 classes.

Both variants run in the same process on the same inputs; the time is forward + backward (median
of ``--repeat`` runs after ``--warmup``). Memory: on CUDA the peak allocated during forward +
backward above the inputs; everywhere, the bytes autograd keeps for backward (saved tensors,
excluding the inputs themselves), which is what grows with batch size and anchors.

    python bench/losses_detection.py --device cpu
    python bench/losses_detection.py --device cuda --focal-batch 16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import box_iou, sigmoid_focal_loss

import fewsight
from fewsight.geometry import IGNORE, AnchorGenerator, BoxCoder, default_boxes
from fewsight.losses.focal import anchor_labels, focal_loss_detection
from fewsight.losses.multibox import multibox_loss

SSD300_FEATURES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


# --- baselines ----------------------------------------------------------------------------------------


def sg_style_multibox(cls_logits, bbox_deltas, priors, targets, iou_threshold=0.5, neg_pos_ratio=3, alpha=1.0):
    """super-gradients ``SSDLoss`` semantics: per-image matching loop, batched double-sort mining."""
    num_anchors = priors.shape[0]
    coder = BoxCoder.from_variances((0.1, 0.2))
    boxes_b, labels_b = [], []
    for t in targets:  # the per-image Python loop
        boxes, labels = t["boxes"], t["labels"]
        target_boxes = priors.clone()
        target_labels = torch.zeros(num_anchors, dtype=torch.long, device=priors.device)
        if len(boxes):
            ious = box_iou(boxes, priors)  # [G, A]
            best_iou, best_gt = ious.max(0)
            _, best_prior = ious.max(1)
            best_gt[best_prior] = torch.arange(len(boxes), device=priors.device)
            best_iou[best_prior] = 2.0
            mask = best_iou > iou_threshold
            target_boxes[mask] = boxes[best_gt[mask]]
            target_labels[mask] = labels[best_gt[mask]] + 1
        boxes_b.append(target_boxes)
        labels_b.append(target_labels)
    target_boxes = torch.stack(boxes_b)
    target_labels = torch.stack(labels_b)
    pos = target_labels > 0
    num_pos = pos.sum(1)
    encoded = coder.encode(target_boxes, priors.expand_as(target_boxes))
    sl1 = (F.smooth_l1_loss(bbox_deltas, encoded, reduction="none").sum(-1) * pos).sum(1)
    con = F.cross_entropy(cls_logits.reshape(-1, cls_logits.shape[-1]), target_labels.reshape(-1), reduction="none")
    con = con.view_as(target_labels)
    con_neg = con.clone()
    con_neg[pos] = 0
    _, idx = con_neg.sort(1, descending=True)
    _, rank = idx.sort(1)
    neg_mask = rank < (neg_pos_ratio * num_pos).clamp(max=num_anchors).unsqueeze(-1)
    closs = (con * (pos.float() + neg_mask.float())).sum(1)
    total = (2 - alpha) * sl1 + alpha * closs
    return (total * (num_pos > 0).float() / num_pos.float().clamp(min=1e-6)).mean()


def torchvision_retinanet_focal(cls_logits, targets, matched_idxs):
    """torchvision ``RetinaNetClassificationHead.compute_loss`` (per-image normalisation)."""
    losses = []
    for t, logits_i, idx_i in zip(targets, cls_logits, matched_idxs):
        fg = idx_i >= 0
        num_fg = fg.sum()
        gt_target = torch.zeros_like(logits_i)
        gt_target[fg, t["labels"][idx_i[fg]]] = 1.0
        valid = idx_i != IGNORE
        losses.append(sigmoid_focal_loss(logits_i[valid], gt_target[valid], reduction="sum") / max(1, num_fg))
    return sum(losses) / len(targets)


# --- measurement --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward, not counting the inputs' own."""
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return sum(seen.values())


def measure_pair(fns: dict[str, Callable[[], torch.Tensor]], inputs: list[torch.Tensor], device, warmup: int, repeat: int) -> dict:
    """Time each variant forward + backward, interleaved run by run so that load drift hits both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn().backward()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            for t in inputs:
                t.grad = None
            sync(device)
            start = time.perf_counter()
            fn().backward()
            sync(device)
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, fn in fns.items():
        r = {"time_ms": 1e3 * statistics.median(times[name]), "saved_mb": saved_bytes(fn, inputs) / 2**20}
        if device.type == "cuda":
            for t in inputs:
                t.grad = None
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn().backward()
            torch.cuda.synchronize(device)
            r["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        results[name] = r
    return results


def report(name: str, ours: dict, theirs: dict, baseline: str) -> None:
    print(f"\n{name}")
    keys = [k for k in ("time_ms", "peak_mb", "saved_mb") if k in ours]
    for label, r in (("fewsight", ours), (baseline, theirs)):
        print(f"  {label:<34}" + "  ".join(f"{k}={r[k]:10.2f}" for k in keys))
    ratios = "  ".join(f"{k}: {theirs[k] / ours[k]:.2f}x" if ours[k] > 0 else f"{k}: n/a" for k in keys)
    print(f"  baseline / fewsight                {ratios}")


def hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"CPU: {cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"
    if device.type == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name(device)}"
    return text


# --- data -----------------------------------------------------------------------------------------------


def random_targets(batch: int, gt_range: tuple[int, int], image: int, num_classes: int, device, g) -> list[dict]:
    out = []
    for _ in range(batch):
        n = int(torch.randint(gt_range[0], gt_range[1] + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * (image * 0.7)
        wh = torch.rand(n, 2, generator=g) * (image * 0.5) + image * 0.06
        boxes = torch.cat([xy, (xy + wh).clamp(max=image)], 1)
        out.append({"boxes": boxes.to(device), "labels": torch.randint(0, num_classes, (n,), generator=g).to(device)})
    return out


def bench_multibox(args, device, g) -> None:
    priors = default_boxes((300, 300), SSD300_FEATURES, device=device)
    num_anchors = priors.shape[0]
    targets = random_targets(args.batch, (3, 7), 300, args.classes - 1, device, g)
    logits = (torch.randn(args.batch, num_anchors, args.classes, generator=g)).to(device).requires_grad_(True)
    deltas = (torch.randn(args.batch, num_anchors, 4, generator=g) * 0.5).to(device).requires_grad_(True)

    ours = multibox_loss(logits, deltas, priors, targets)["loss"]
    theirs = sg_style_multibox(logits, deltas, priors, targets)
    print(f"\nMultiBox: B={args.batch}, A={num_anchors}, logits={args.classes}, "
          f"{sum(len(t['labels']) for t in targets) / args.batch:.1f} GT/image; "
          f"loss fewsight {ours.item():.5f} vs super-gradients-style {theirs.item():.5f}")
    r = measure_pair(
        {
            "ours": lambda: multibox_loss(logits, deltas, priors, targets)["loss"],
            "sg": lambda: sg_style_multibox(logits, deltas, priors, targets),
        },
        [logits, deltas], device, args.warmup, args.repeat,
    )
    report("MultiBox loss, forward + backward", r["ours"], r["sg"], "super-gradients-style loop")


def bench_focal(args, device, g) -> None:
    size = args.focal_size
    anchors = AnchorGenerator()((size, size)).to(device)
    num_anchors = anchors.shape[0]
    batch, num_classes = args.focal_batch, 80
    targets = random_targets(batch, (3, 7), size, num_classes, device, g)
    # Matched indices as a RetinaNet would get them: ~1% positives, ~4% ignored, the rest background.
    r = torch.rand(batch, num_anchors, generator=g)
    gt_idx = torch.stack([torch.randint(0, len(t["labels"]), (num_anchors,), generator=g) for t in targets])
    matched = torch.where(r < 0.01, gt_idx, torch.where(r < 0.05, IGNORE, -1)).to(device)
    gt_labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True, padding_value=-1)
    labels = anchor_labels(matched, gt_labels)
    logits = (torch.randn(batch, num_anchors, num_classes, generator=g) - 4.0).to(device).requires_grad_(True)
    matched_list = list(matched)

    ours_sum = focal_loss_detection(logits, labels, reduction="sum")
    tv_sum = sum(
        sigmoid_focal_loss(lg[m != IGNORE], F.one_hot(lb.clamp(min=0), num_classes)[m != IGNORE].float() * (lb[m != IGNORE] >= 0).unsqueeze(-1), reduction="sum")
        for lg, lb, m in zip(logits, labels, matched)
    )
    print(f"\nFocal: B={batch}, A={num_anchors} ({size}x{size}, P3-P7 x 9), C={num_classes}; summed loss "
          f"fewsight {ours_sum.item():.3f} vs torchvision {tv_sum.item():.3f} "
          f"(rel. diff {abs(ours_sum.item() - tv_sum.item()) / tv_sum.item():.1e}; the normalisers differ: "
          "batch positives here, per-image positives in torchvision)")
    r = measure_pair(
        {
            "ours": lambda: focal_loss_detection(logits, labels),
            "tv": lambda: torchvision_retinanet_focal(logits, targets, matched_list),
        },
        [logits], device, args.warmup, args.repeat,
    )
    report("Focal detection loss, forward + backward", r["ours"], r["tv"], "torchvision RetinaNet-style loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=32, help="MultiBox batch size")
    parser.add_argument("--classes", type=int, default=21, help="MultiBox logits per box (classes + background)")
    parser.add_argument("--focal-batch", type=int, default=4)
    parser.add_argument("--focal-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--only", choices=["multibox", "focal"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)

    print(f"fewsight {fewsight.__version__ if hasattr(fewsight, '__version__') else '?'}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, Python {platform.python_version()}")
    print(hardware(device))
    g = torch.Generator().manual_seed(0)
    if args.only in (None, "multibox"):
        bench_multibox(args, device, g)
    if args.only in (None, "focal"):
        bench_focal(args, device, g)


if __name__ == "__main__":
    main()
