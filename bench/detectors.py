"""fewsight RetinaNet / DLDENet vs torchvision's RetinaNet on the same ResNet-FPN backbone.

Three timings per model, all in this process on the same inputs (median of ``--repeat`` runs after
``--warmup``; the models are interleaved within each repetition so machine load hits all alike):

1. training step: forward + backward + SGD step, ``B x 3 x S x S`` images with ~8 boxes each;
2. inference throughput: eval forward including post-processing, images per second;
3. matching + loss alone, forward + backward from fixed head outputs (leaves with grad):
   torchvision ``model.compute_loss(targets, head_outputs, anchors)`` (its per-image ``Matcher`` loop, then
   ``model.head.compute_loss``) vs fewsight ``model.compute_loss(head_outputs, anchors, targets)``
   (one batched match, batched focal / box losses).

torchvision's model gets the same backbone design (ResNet body, FPN on C3-C5, P6/P7 from P5, 256
channels, BatchNorm as built with ``weights=None``), the same anchors (sizes 32-512 x 3 scales x 3
ratios), ``min_size = max_size = S`` so it does not rescale, and 4-conv heads with 256 channels.

    python bench/detectors.py                                  # CPU, resnet18, 2 x 512 x 512
    python bench/detectors.py --threads 1                      # steadier on a shared CPU
    python bench/detectors.py --device cuda --batch 8 --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
import torchvision
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNetHead as TVRetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from _env import cpu_name  # bench/ is on sys.path when a script runs
import fewsight
from fewsight.models import DLDENet, RetinaNet


def build_torchvision(backbone: str, num_classes: int, size: int) -> TVRetinaNet:
    body = getattr(torchvision.models, backbone)(weights=None)
    fpn = _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512))
    anchors = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    head = TVRetinaNetHead(fpn.out_channels, anchors.num_anchors_per_location()[0], num_classes)
    return TVRetinaNet(fpn, num_classes, min_size=size, max_size=size, anchor_generator=anchors, head=head)


def make_batch(batch: int, size: int, num_classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        n = 8
        wh = 32 + torch.rand(n, 2, generator=g) * (size / 2 - 32)
        xy = torch.rand(n, 2, generator=g) * (size - wh)
        boxes = torch.cat((xy, xy + wh), dim=1)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, device: torch.device, repeat: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast dtype for forward passes")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-dldenet", action="store_true", help="skip DLDENet (its 256-d embedding head is heavier)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (on a shared machine 1 avoids OpenMP barriers waiting for descheduled threads)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeat = args.repeat or (20 if device.type == "cuda" else 5)
    hw = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, fewsight {fewsight.__version__}, "
        f"python {platform.python_version()}; {hw}"
    )
    print(
        f"backbone {args.backbone}-FPN P3-P7, batch {args.batch} x 3 x {args.size} x {args.size}, "
        f"{args.classes} classes, amp {args.amp}, median of {repeat} (warmup {args.warmup})"
    )
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.amp == "bf16"
        else contextlib.nullcontext
    )

    torch.manual_seed(0)
    models = {
        "torchvision RetinaNet": build_torchvision(args.backbone, args.classes, args.size),
        "fewsight RetinaNet": RetinaNet(args.classes, backbone=args.backbone),
    }
    if not args.no_dldenet:
        models["fewsight DLDENet"] = DLDENet(args.classes, backbone=args.backbone)
    for m in models.values():
        m.to(device)
    images, targets = make_batch(args.batch, args.size, args.classes, device)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}

    # 1. training step
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-6, momentum=0.9) for k, m in models.items()}

    def train_step(name):
        model, opt = models[name], opts[name]

        def fn():
            with autocast():
                losses = model(images, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return fn

    for m in models.values():
        m.train()
    t_train = interleaved({k: train_step(k) for k in models}, device, repeat, args.warmup)

    # 2. inference throughput
    for m in models.values():
        m.eval()

    def infer(name):
        def fn():
            with torch.inference_mode(), autocast():
                models[name](images)

        return fn

    t_infer = interleaved({k: infer(k) for k in models}, device, repeat, args.warmup)

    # 3. matching + loss from fixed head outputs (fwd + bwd)
    loss_fns = {}
    tv = models["torchvision RetinaNet"]
    tv.train()
    with torch.no_grad():
        tv_images, tv_targets = tv.transform(images, [dict(t) for t in targets])
        feats = list(tv.backbone(tv_images.tensors).values())
        tv_out = {k: v.detach() for k, v in tv.head(feats).items()}
        tv_anchors = tv.anchor_generator(tv_images, feats)

    def tv_loss():
        outs = {k: v.clone().requires_grad_() for k, v in tv_out.items()}
        losses = tv.compute_loss(tv_targets, outs, tv_anchors)
        sum(losses.values()).backward()

    loss_fns["torchvision RetinaNet"] = tv_loss
    for name in [k for k in models if k.startswith("fewsight")]:
        model = models[name]
        model.train()
        with torch.no_grad():
            out = model.forward_head(images)
        fixed = {k: v.detach() for k, v in out.outputs.items()}

        def ours_loss(model=model, fixed=fixed, anchors=out.anchors):
            outs = {k: v.clone().requires_grad_() for k, v in fixed.items()}
            losses = model.compute_loss(outs, anchors, targets)
            sum(losses.values()).backward()

        loss_fns[name] = ours_loss
    t_loss = interleaved(loss_fns, device, max(repeat, 10), args.warmup)
    anchors_count = tv_out["cls_logits"].shape[1]

    base = "torchvision RetinaNet"
    print(f"anchors per image: {anchors_count}")
    print(f"{'model':<24}{'params':>11}{'train step ms':>15}{'infer img/s':>13}{'match+loss ms':>15}")
    for k in models:
        print(
            f"{k:<24}{params[k]:>11,}{t_train[k] * 1e3:>15.1f}{args.batch / t_infer[k]:>13.2f}{t_loss[k] * 1e3:>15.2f}"
        )
    for k in models:
        if k == base:
            continue
        print(
            f"{k} vs torchvision: train step time ratio {t_train[k] / t_train[base]:.2f} (<= 1 is faster), "
            f"inference throughput ratio {t_infer[base] / t_infer[k]:.2f} (>= 1 is faster), "
            f"match+loss speedup {t_loss[base] / t_loss[k]:.1f}x"
        )


if __name__ == "__main__":
    main()
