"""Exploratory: score enrolled emoji classes with a metric-learning network on box crops.

    python bench/metric_learning.py --methods circle_arcface --seeds 0 --size 192 --grid 3 --threads 1 \\
        --tta-scales 1.0 0.9 0.8 --save-embeddings runs/ca --save-net runs/ca
    fewsight train --config configs/emoji_base.yaml
    python bench/fewshot_crop_rescoring.py runs/emoji_base/model.pt runs/ca/circle_arcface_seed0_net.pt \\
        runs/ca/circle_arcface_seed0.pt

The base detector proposes boxes; a separate embedding network, trained for cross-style invariance on
the base emoji (bench/metric_learning.py), embeds each box crop; a novel class is enrolled as the mean
crop embedding of its k Google-style support boxes (learned whitening fitted on base classes, as in the
retrieval benchmark). The enrolled classes' detections are then:

* candidates: the base model's detections with score >= 0.001 (up to 100 per image), merged across
  classes by class-agnostic NMS at IoU 0.5, the ``--candidates`` best per image; ``obj`` = their best
  detector score;
* each candidate gets its ``--top`` most similar novel classes, with score ``obj ** a * (1 + cos) / 2``
  (``a`` from ``--obj-power``; 0 ranks by crop similarity alone).

Base-class detections are the base model's own. Novel AP50 is compared with plain enrollment
(``DLDENet.enroll`` with calibrate and rivalry 5, the benchmark's settings) on the same support draws
and test canvases. This is a measurement for the design of the product, not part of it.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from metric_learning import MobileNetEmbedding  # noqa: E402

from fewsight.data import emoji_classes  # noqa: E402
from fewsight.eval import DetectionEvaluator  # noqa: E402
from fewsight.eval.evaluate import predict  # noqa: E402
from fewsight.fewshot.protocol import enroll_support, mean_interval, sample_support  # noqa: E402
from fewsight.fewshot.emoji import emoji_fewshot_datasets  # noqa: E402
from fewsight.models import crop_boxes  # noqa: E402
from fewsight.retrieval import learn_whitening  # noqa: E402
from fewsight.train import load_detector  # noqa: E402


@torch.no_grad()
def embed_crops(net, images: list[torch.Tensor], boxes: list[torch.Tensor], size: int, chunk: int = 64) -> list[torch.Tensor]:
    """Crop embedding ``Tensor[n_i, D]`` of each image's boxes (``fewsight.models.crop_boxes`` to ``size``)."""
    out = []
    for i in range(0, len(images), chunk // 8):
        crops = crop_boxes(images[i : i + chunk // 8], boxes[i : i + chunk // 8], size)
        out.append(net(crops) if len(crops) else crops.new_zeros(0, net.head.out_features))
    flat = torch.cat(out) if out else torch.zeros(0, net.head.out_features)
    return list(flat.split([len(b) for b in boxes]))


def ap50(preds, targets, names, classes) -> float:
    ev = DetectionEvaluator(names, distributed=False)
    ev.update(preds, targets)
    per = ev.compute()["per_class"]
    vals = [per[names[c]]["ap50"] for c in classes]
    vals = [v for v in vals if v == v]
    return float(np.mean(vals))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("net", help="state_dict of bench/metric_learning.py --save-net (mobilenet_v2, 3x3 grid, 128-D)")
    p.add_argument("embeddings", help="bench/metric_learning.py --save-embeddings file of that net (for whitening)")
    p.add_argument("--root", default="data/emoji")
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--obj-power", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load_detector(args.checkpoint).eval()
    net = MobileNetEmbedding(14, 128, grid=args.grid)
    net.load_state_dict(torch.load(args.net, weights_only=True))
    net.eval()
    saved = torch.load(args.embeddings, weights_only=True)
    whiten = learn_whitening(saved["train_views"], saved["train_labels"])
    index = {n: i for i, n in enumerate(emoji_classes(args.root).names)}
    data = emoji_fewshot_datasets(args.root, base=[index[c] for c in model.classes], num_support=300,
                                  num_test=args.num_images)
    names, novel, num_base = data.classes, list(data.novel), len(model.classes)

    proposer = copy.deepcopy(model)
    proposer.score_threshold, proposer.detections_per_image = 0.001, 100
    tests = {}
    for style, ds in data.tests.items():
        images = [ds[i][0] for i in range(len(ds))]
        targets = [ds[i][1] for i in range(len(ds))]
        base_preds = predict(model, images, progress=False)
        props = predict(proposer, images, progress=False)
        cand = []
        for pr in props:
            keep = torchvision.ops.nms(pr["boxes"], pr["scores"], 0.5)[: args.candidates]
            cand.append((pr["boxes"][keep], pr["scores"][keep]))
        emb = embed_crops(net, images, [c[0] for c in cand], args.size)
        tests[style] = (images, targets, base_preds, cand, [whiten(e.double()).float() for e in emb])
        print(f"{style}: {sum(len(c[0]) for c in cand) / len(cand):.1f} candidates per image", flush=True)

    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        support = sample_support(data.support, novel, args.shots, seed)
        sup_images = support.images(data.support)
        enrolled = copy.deepcopy(model)
        enroll_support(enrolled, sup_images, support, data.novel_names, calibrate=True, rivalry=5.0)
        sup_boxes = [t["boxes"][t["labels"] >= 0] for t in support.targets]
        sup_labels = torch.cat([t["labels"][t["labels"] >= 0] for t in support.targets])
        sup_emb = whiten(torch.cat(embed_crops(net, sup_images, sup_boxes, args.size)).double()).float()
        protos = torch.zeros(len(novel), sup_emb.shape[1]).index_add_(0, sup_labels, sup_emb)
        protos = F.normalize(protos, dim=1)
        for style, (images, targets, base_preds, cand, emb) in tests.items():
            preds = predict(enrolled, images, progress=False)
            rows.setdefault(f"{style} enroll (detector embedding)", []).append(ap50(preds, targets, names, novel))
            for a in args.obj_power:
                out = []
                for bp, (boxes, obj), e in zip(base_preds, cand, emb):
                    cos = e @ protos.T  # [n, N_novel]
                    top = cos.topk(min(args.top, len(novel)), dim=1)
                    n = len(boxes)
                    score = obj[:, None].clamp(min=1e-6) ** a * (1 + top.values) / 2
                    out.append({
                        "boxes": torch.cat([bp["boxes"], boxes.repeat_interleave(top.indices.shape[1], 0)]),
                        "scores": torch.cat([bp["scores"], score.flatten()]),
                        "labels": torch.cat([bp["labels"], (top.indices + num_base).flatten()]),
                    }) if n else out.append(bp)
                rows.setdefault(f"{style} crop rescoring, obj^{a:g}", []).append(ap50(out, targets, names, novel))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rows.items()), flush=True)
    print()
    print(f"| test scenes, {args.shots}-shot | novel AP50 (mean ± 95% over {args.seeds} draws) |")
    print("|---|---|")
    for k, v in rows.items():
        m, h = mean_interval(v)
        print(f"| {k} | {m:.3f} ± {h:.3f} |")


if __name__ == "__main__":
    main()
