"""A fast proxy of k-shot enrollment: rank test objects (perfect boxes) by the score enrollment gives them.

    python bench/fewshot_proxy.py runs/demo/model.pt                               # digits, ~30 s, 1 thread
    python bench/fewshot_proxy.py runs/emoji_base/model.pt --data emoji --draws 3  # emoji-logos, ~1 min

Every annotated object of the test canvases is embedded with ``DLDENet.embed_boxes``; for each of
``--draws`` random k-shot support sets per novel class, the class direction is the mean support
embedding and objects are ranked by the score enrollment gives them: ``p = sigmoid(w (cos + b))``
(the model's default w, b) times the rivalry gate ``sigmoid(r (cos - max trained cos))``. The printed
figure is the mean average precision of that ranking over novel classes and draws. It leaves out
localisation and background: use it to compare base recipes in seconds instead of minutes.

* ``--data digits`` (novel 8 and 9; 200 test canvases, seed 1; support from 300 training canvases,
  seed 100) tracks ``fewsight bench fewshot`` within about 0.01 on the demo model (docs/results.md).
* ``--data emoji`` (``fewsight.fewshot.emoji.emoji_fewshot_datasets`` over the model's base classes:
  the 50 novel classes, 300 Google-style support canvases, ``--num-images`` test canvases per style)
  prints same-style and cross-style figures; detection AP is lower than the proxy, most of all
  cross-style (0.42 against 0.59 on runs/emoji_base), where scores of true objects are low.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from fewsight.data import DigitsDataset
from fewsight.hub import load_model


def average_precision(positive: torch.Tensor, score: torch.Tensor) -> float:
    """Non-interpolated AP of a ranking (mean precision at each positive, as sklearn without ties)."""
    hits = positive[score.argsort(descending=True)].float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum().clamp(min=1))


def embed_objects(model: torch.nn.Module, dataset, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings, labels = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        with torch.no_grad():
            embeddings += model.embed_boxes([x for x, _ in items], [t["boxes"] for _, t in items])
        labels += [t["labels"] for _, t in items]
    return F.normalize(torch.cat(embeddings), dim=1), torch.cat(labels)


def proxy_ap(
    model: torch.nn.Module,
    pool: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    novel: list[int],
    shots: int,
    draws: int,
    rivalry: list[float],
) -> dict[float, float]:
    """Mean AP over novel classes and support draws, per rivalry ``r`` (0: the plain probability)."""
    (pool_e, pool_y), (test_e, test_y) = pool, test
    w, b = model.classifier.init_scale, model.classifier.init_bias  # what enroll gives a new class
    trained = F.normalize(model.classifier.directions().detach().float(), dim=1)
    best_trained = (test_e @ trained.T).max(dim=1).values
    scores: dict[float, list[float]] = {r: [] for r in rivalry}
    for draw in range(draws):
        g = torch.Generator().manual_seed(draw)
        for c in novel:
            if not bool((test_y == c).any()):
                continue
            candidates = (pool_y == c).nonzero().flatten()
            support = pool_e[candidates[torch.randperm(len(candidates), generator=g)[:shots]]]
            cos = test_e @ F.normalize(support.mean(0), dim=0)
            prob = torch.sigmoid(w * (cos + b))
            for r in rivalry:
                score = prob * torch.sigmoid(r * (cos - best_trained)) if r > 0 else prob
                scores[r].append(average_precision(test_y == c, score))
    return {r: float(np.mean(v)) for r, v in scores.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a DLDENet trained on the base classes (digits 0-7, or configs/emoji_base.yaml)")
    p.add_argument("--data", default="digits", choices=("digits", "emoji"))
    p.add_argument("--emoji-root", default="data/emoji")
    p.add_argument("--num-images", type=int, default=None, help="test canvases (per style); default 200 / 150")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--draws", type=int, default=10, help="support draws per novel class")
    p.add_argument("--rivalry", type=float, nargs="+", default=[0.0, 5.0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    if args.data == "digits":
        pool = embed_objects(model, DigitsDataset("train", 300, seed=100))
        tests = {"": DigitsDataset("test", args.num_images or 200, seed=1)}
        novel = [8, 9]
    else:
        from fewsight.data import emoji_classes
        from fewsight.fewshot.emoji import emoji_fewshot_datasets

        index = {n: i for i, n in enumerate(emoji_classes(args.emoji_root).names)}
        data = emoji_fewshot_datasets(args.emoji_root, base=[index[c] for c in model.classes], num_support=300,
                                      num_test=args.num_images or 150)
        pool = embed_objects(model, data.support, batch=8)
        tests = {f"{data.support_style} (same style) ": data.test_same, f"{data.cross_style} (cross style) ": data.test_cross}
        novel = list(data.novel)
    for name, dataset in tests.items():
        result = proxy_ap(model, pool, embed_objects(model, dataset, batch=8), novel, args.shots, args.draws, args.rivalry)
        for r, ap in result.items():
            print(f"{name}rivalry {r:g}: object-level {args.shots}-shot AP {ap:.3f} ({args.draws} draws x {len(novel)} classes)")


if __name__ == "__main__":
    main()
