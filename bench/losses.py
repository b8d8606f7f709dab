"""Metric losses vs their peers, same process, forward + backward, same inputs.

    python bench/losses.py                  # CPU, N=4096, D=128 (center: C=1024)
    python bench/losses.py --device cuda --n 32768 --d 512

Peers: pytorch-metric-learning CircleLoss and TripletMarginLoss + BatchHardMiner, pytorch-ood
CenterLoss (whose value is ours / C). Large-N circle-loss memory runs live in bench/losses_circle.py;
MultiBox and focal in bench/losses_detection.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import fewsight as fs
from fewsight.losses import functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB on CUDA or nan) of ``fn()`` followed by backward."""
    fn().backward()
    _sync(device)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn().backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return statistics.median(times), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--classes", type=int, default=1024, help="classes for the center loss")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)

    import pytorch_metric_learning
    import pytorch_ood
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    from pytorch_ood.loss import CenterLoss as OODCenterLoss

    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    print(
        f"torch {torch.__version__}, pytorch-metric-learning {pytorch_metric_learning.__version__}, "
        f"pytorch-ood {getattr(pytorch_ood, '__version__', '?')}, fewsight {fs.__version__}; {hw}"
    )
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d = args.n, args.d
    emb = torch.randn(n, d, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, max(2, n // 32), (n,), generator=g).to(device)
    rows = []

    circle_pml = pml_losses.CircleLoss(m=0.25, gamma=256)
    rows.append(("circle (m=0.25, γ=256)", "PML CircleLoss",
                 bench(lambda: F.circle_loss(emb, labels), device, args.repeats),
                 bench(lambda: circle_pml(emb, labels), device, args.repeats)))

    trip_pml, miner = pml_losses.TripletMarginLoss(margin=0.2), pml_miners.BatchHardMiner()
    rows.append(("triplet batch-hard (0.2)", "PML TripletMarginLoss+BatchHardMiner",
                 bench(lambda: F.triplet_loss(emb, labels, margin=0.2, mining="batch_hard"), device, args.repeats),
                 bench(lambda: trip_pml(emb, labels, miner(emb, labels)), device, args.repeats)))

    c = args.classes
    clabels = torch.randint(0, c, (n,), generator=g).to(device)
    ood = OODCenterLoss(n_classes=c, n_dim=d).to(device)
    centers = ood.centers.params.detach().clone().requires_grad_()
    rows.append((f"center (C={c})", "pytorch-ood CenterLoss",
                 bench(lambda: F.center_loss(emb, clabels, centers), device, args.repeats),
                 bench(lambda: ood(ood.distance(emb), clabels), device, args.repeats)))

    print(f"N={n}, D={d}, device={device.type}, fwd+bwd median of {args.repeats}")
    print(f"{'loss':<26}{'peer':<40}{'fewsight ms':>12}{'peer ms':>10}{'speedup':>9}{'peak MiB ours/peer':>21}")
    for name, peer, (t_ours, m_ours), (t_peer, m_peer) in rows:
        print(f"{name:<26}{peer:<40}{t_ours * 1e3:>12.2f}{t_peer * 1e3:>10.2f}{t_peer / t_ours:>8.1f}x{m_ours:>10.1f}/{m_peer:<10.1f}")


if __name__ == "__main__":
    main()
