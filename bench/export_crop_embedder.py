"""Turn a metric-learning network of bench/metric_learning.py into a fewsight.models.CropEmbedder file.

    python bench/metric_learning.py --methods circle_arcface --seeds 0 --size 192 --grid 3 --threads 1 \\
        --save-net runs/ca
    python bench/export_crop_embedder.py runs/ca/circle_arcface_seed0_net.pt --grid 3 --out runs/ca/embedder.pt

Loads the network's weights and fits the learned whitening (``fewsight.retrieval.learn_whitening``) on two
augmented epochs of the BASE emoji classes in both styles, embedded by the exported network itself
(no test-time augmentation, as at detection time). The novel classes are not touched. The file is what
``fewsight bench fewshot --crop-embedder`` and ``fewsight.models.CropEmbedder.load`` read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fewsight.data import EmojiCrops, emoji_classes
from fewsight.fewshot import CropEmbedder
from fewsight.retrieval import learn_whitening


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("net", help="bench/metric_learning.py --save-net state_dict (mobilenet_v2 net)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--root", default="data/emoji")
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--blocks", type=int, default=14)
    p.add_argument("--size", type=int, default=192, help="crop side (the network's training size)")
    p.add_argument("--no-whitening", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    net = CropEmbedder(dim=args.dim, grid=args.grid, blocks=args.blocks, crop_size=args.size, pretrained=False)
    net.load_network(args.net)
    net.eval()
    if not args.no_whitening:
        base = list(emoji_classes(args.root).base)
        views = EmojiCrops(args.root, base, "both", size=args.size, augment=True, split="train", seed=0)
        emb, labels = [], []
        with torch.no_grad():
            for epoch in (1000, 1001):  # augmentations the training never used
                views.set_epoch(epoch)
                for s in range(0, len(views), 128):
                    items = [views[i] for i in range(s, min(s + 128, len(views)))]
                    emb.append(net.embed_crops(torch.stack([x for x, _ in items])))
                    labels += [y for _, y in items]
        w = learn_whitening(torch.cat(emb), torch.tensor(labels))
        net.set_whitening(w.mean, w.projection)
        print(f"whitening fitted on {len(labels)} views of {len(base)} base classes")
    print(f"wrote {net.save(args.out)}")


if __name__ == "__main__":
    main()
