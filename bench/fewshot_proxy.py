"""A fast proxy of 5-shot digits enrollment: rank test objects (perfect boxes) by the enrolled score.

    python bench/fewshot_proxy.py runs/demo/model.pt            # ~30 s on one CPU thread

Every annotated object of the 200 test canvases (seed 1) is embedded with ``DLDENet.embed_boxes``;
for each of ``--draws`` random 5-shot support sets per novel class (from 300 training canvases,
seed 100) the class direction is the mean support embedding, and objects are ranked by the score
enrollment gives them: ``p = sigmoid(w (cos + b))`` (the model's default w, b) times the
rivalry gate ``sigmoid(r (cos - max trained cos))``. The printed figure is the mean average
precision of that ranking over classes 8, 9 and draws. It leaves out localisation and background,
and tracks ``fewsight bench fewshot`` within about 0.01 on the demo model (docs/results.md); use it
to compare base recipes in seconds instead of minutes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from fewsight.data import DigitsDataset
from fewsight.train import load_detector


def average_precision(positive: torch.Tensor, score: torch.Tensor) -> float:
    """Non-interpolated AP of a ranking (mean precision at each positive, as sklearn without ties)."""
    hits = positive[score.argsort(descending=True)].float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum().clamp(min=1))


def embed_objects(model: torch.nn.Module, dataset: DigitsDataset) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings, labels = [], []
    for start in range(0, len(dataset), 16):
        items = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
        with torch.no_grad():
            embeddings += model.embed_boxes([x for x, _ in items], [t["boxes"] for _, t in items])
        labels += [t["labels"] for _, t in items]
    return F.normalize(torch.cat(embeddings), dim=1), torch.cat(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a DLDENet trained on digits 0-7 (fewsight demo's model.pt)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--draws", type=int, default=10, help="support draws per novel class")
    p.add_argument("--rivalry", type=float, nargs="+", default=[0.0, 5.0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_detector(args.checkpoint).eval()
    test_e, test_y = embed_objects(model, DigitsDataset("test", 200, seed=1))
    pool_e, pool_y = embed_objects(model, DigitsDataset("train", 300, seed=100))
    w, b = model.classifier.init_scale, model.classifier.init_bias  # what enroll gives a new class
    trained = F.normalize(model.classifier.directions().detach().float(), dim=1)
    best_trained = (test_e @ trained.T).max(dim=1).values
    scores: dict[float, list[float]] = {r: [] for r in args.rivalry}
    for draw in range(args.draws):
        g = torch.Generator().manual_seed(draw)
        for c in (8, 9):
            pool = (pool_y == c).nonzero().flatten()
            support = pool_e[pool[torch.randperm(len(pool), generator=g)[: args.shots]]]
            cos = test_e @ F.normalize(support.mean(0), dim=0)
            prob = torch.sigmoid(w * (cos + b))
            for r in args.rivalry:
                score = prob * torch.sigmoid(r * (cos - best_trained)) if r > 0 else prob
                scores[r].append(average_precision(test_y == c, score))
    for r, values in scores.items():
        print(f"rivalry {r:g}: object-level {args.shots}-shot AP {np.mean(values):.3f} ({args.draws} draws x 2 classes)")


if __name__ == "__main__":
    main()
