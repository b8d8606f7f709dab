"""Post-hoc learned whitening (Radenovic et al. 2018) of the embeddings saved by bench/metric_learning.py.

    python bench/metric_learning.py --methods circle --seeds 0 --save-embeddings runs/ml
    python bench/metric_learning_whitening.py runs/ml/circle_seed0.pt

``fewsight.retrieval.learn_whitening``, fitted on BASE classes only (two augmented epochs of the
training set, both styles): the scatter of each view around its class mean ("whitened") or of the
differences of the Google-Twitter matching pairs ("pair-whitened", Radenovic et al.'s C_S) is
whitened, then the class means are rotated onto their principal axes; applied to the novel Google
queries and Twitter gallery before the cosine. Also prints the transductive per-domain centring (each
set minus its own mean) for comparison.

Each map is also scored with CSLS (cross-domain similarity local scaling, Conneau et al. 2018), the
hubness correction of cross-lingual word retrieval: ``csls(q, g) = 2 cos(q, g) - r(g)`` with ``r(g)`` the
mean cosine of gallery item g to its k nearest Google-style images, so a gallery item that is close to
everything (a hub) stops winning queries of other classes (the query's own term is constant per query
and does not change its ranking). Those k nearest are taken among the augmented BASE Google-style
views ("CSLS base ref", no novel image involved), or, transductively, among the novel queries
themselves ("CSLS query ref", Conneau et al.'s setting, printed for comparison only).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

from fewsight.retrieval import csls_similarity, learn_whitening, recall_at_k


def csls_recall_at_1(q: Tensor, ql: Tensor, g: Tensor, gl: Tensor, ref: Tensor, k: int) -> float:
    """Recall@1 under ``fewsight.retrieval.csls_similarity`` (one gallery item per class here)."""
    return (gl[csls_similarity(q, g, ref, k).argmax(1)] == ql).double().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("embeddings", nargs="+",
                   help="file(s) written by bench/metric_learning.py --save-embeddings; with several (e.g. two seeds), "
                        "the ensemble (each network's unit embeddings concatenated) is reported too")
    p.add_argument("--shrink", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--csls-k", type=int, default=10, help="CSLS neighbourhood size (Conneau et al.: 10)")
    args = p.parse_args()
    runs = [torch.load(path, weights_only=True) for path in args.embeddings]
    ql, gl = runs[0]["novel_query_labels"], runs[0]["novel_gallery_labels"]
    for d in runs[1:]:
        if not (torch.equal(d["novel_query_labels"], ql) and torch.equal(d["novel_gallery_labels"], gl)):
            raise SystemExit("embeddings: the files hold different query / gallery sets")
    # Per file: "cosine" and each shrink map an embedding set to unit vectors.
    maps: dict[str, list] = {"cosine": [lambda x: F.normalize(x.double(), dim=1)] * len(runs)}
    for shrink in args.shrink:
        maps[f"whitened, shrink {shrink:.1f}"] = [
            lambda x, w=learn_whitening(d["train_views"], d["train_labels"], shrink=shrink): w(x.double()) for d in runs
        ]
        maps[f"pair-whitened, shrink {shrink:.1f}"] = [
            lambda x, w=learn_whitening(d["train_views"], d["train_labels"], domains=d["train_styles"], shrink=shrink):
            w(x.double())
            for d in runs
        ]
    for name, fns in maps.items():
        for path, d, fn in zip(args.embeddings, runs, fns):
            q, g = fn(d["novel_query"]), fn(d["novel_gallery"])
            r1 = recall_at_k(q, ql, g, gl, k=(1,))[1]
            base_ref = fn(d["train_views"][d["train_styles"] == 0])
            c_base = csls_recall_at_1(q, ql, g, gl, base_ref, args.csls_k)
            c_query = csls_recall_at_1(q, ql, g, gl, q, args.csls_k)
            print(f"{name:<26}  novel R@1 {r1:.3f}  CSLS base ref {c_base:.3f}  CSLS query ref {c_query:.3f}  {path}")
        if len(runs) > 1:
            q = torch.cat([fn(d["novel_query"]) for d, fn in zip(runs, fns)], dim=1)
            g = torch.cat([fn(d["novel_gallery"]) for d, fn in zip(runs, fns)], dim=1)
            print(f"{name:<26}  novel R@1 {recall_at_k(q, ql, g, gl, k=(1,))[1]:.3f}  ensemble of {len(runs)}")
    for path, d in zip(args.embeddings, runs):
        qn, gn = F.normalize(d["novel_query"], dim=1), F.normalize(d["novel_gallery"], dim=1)
        r1 = recall_at_k(qn - qn.mean(0), ql, gn - gn.mean(0), gl, k=(1,))[1]
        print(f"{'per-domain centring':<26}  novel R@1 {r1:.3f}  {path}")


if __name__ == "__main__":
    main()
