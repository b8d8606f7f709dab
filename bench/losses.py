"""Metric losses vs their peers, same process, forward + backward, same inputs.

    python bench/losses.py                  # CPU, N=4096, D=128 (center: C=1024), then the triplet tables
    python bench/losses.py --threads 1 --sections triplet,peak
    python bench/losses.py --device cuda --n 32768 --d 512

Sections:

* ``basic``: circle, triplet batch-hard and center at ``--n`` x ``--d`` against pytorch-metric-learning
  CircleLoss / TripletMarginLoss + BatchHardMiner and pytorch-ood CenterLoss (whose value is ours / C).
* ``triplet``: every triplet mining at P x K = 1,024 x 4 and 128 x 32 (``--triplet-d``, default 64)
  against PML, timed interleaved (peer, ours, peer, ours, ...; median of ``--repeats``). Peers:
  batch_hard = TripletMarginLoss(MeanReducer) + BatchHardMiner (equal values, checked);
  PML's default distance normalises the embeddings, so fewsight runs with ``normalize=True``;
  batch_all = TripletMarginLoss without a miner, default AvgNonZeroReducer (equal values, checked);
  semi_hard = TripletMarginLoss + TripletMarginMiner("semihard") (PML keeps every triplet with
  d_ap < d_an < d_ap + margin, a different rule from FaceNet's one negative per pair: timing only).
  PML materialises every triplet (about 56 bytes each, measured); a case it cannot hold in the
  available RAM is skipped and says how much it would need.
* ``peak``: peak memory of one fewsight forward + backward per mining at N = ``--peak-n`` (32,768),
  D = ``--triplet-d``, each case in a fresh subprocess: CPU the peak RSS above the inputs (Linux
  VmHWM after resetting it through /proc/self/clear_refs: every byte of tensor memory the
  process touched, allocator slack included), CUDA ``torch.cuda.max_memory_allocated`` above the inputs.

Large-N circle-loss memory runs live in bench/losses_circle.py; MultiBox and focal in
bench/losses_detection.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
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


TRIPLET_SHAPES = ((1024, 4), (128, 32))
MININGS = ("batch_hard", "batch_all", "semi_hard")
PML_BYTES_PER_TRIPLET = 56  # PML's all-triplets path: 3 int64 indices + float distances / grads per triplet


def _rss_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def _triplet_batch(p: int, k: int, d: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = p * k
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()
    labels = torch.arange(p).repeat_interleave(k)[torch.randperm(n, generator=g)].to(device)
    return x, labels


def _pml_triplet(mining: str, margin: float):
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    from pytorch_metric_learning import reducers as pml_reducers

    if mining == "batch_hard":
        loss, miner = pml_losses.TripletMarginLoss(margin=margin, reducer=pml_reducers.MeanReducer()), pml_miners.BatchHardMiner()
        return lambda x, y: loss(x, y, miner(x, y))
    loss = pml_losses.TripletMarginLoss(margin=margin)
    if mining == "batch_all":
        return loss
    miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
    return lambda x, y: loss(x, y, miner(x, y))


def _interleaved(fns, device, repeats: int) -> list[float]:
    """Median seconds of forward + backward for each fn, run in turn (warm-up round first)."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats + 1):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            fn().backward()
            _sync(device)
            if r:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def triplet_section(device: torch.device, d: int, repeats: int, margin: float = 0.2) -> None:
    print(f"\nTriplet minings vs PML, D={d}, margin={margin}, fwd+bwd, interleaved, median of {repeats}")
    print(f"{'mining':<12}{'P x K':>12}{'N':>7}{'fewsight ms':>13}{'PML ms':>11}{'speedup':>9}  check")
    for p, k in TRIPLET_SHAPES:
        x, y = _triplet_batch(p, k, d, device)
        n = p * k
        for mining in MININGS:
            # PML's default distance is LpDistance(normalize_embeddings=True): ours with normalize=True.
            ours = lambda: F.triplet_loss(x, y, margin=margin, mining=mining, normalize=True)  # noqa: E731
            triplets = n * (k - 1) * (n - k)
            need = triplets * PML_BYTES_PER_TRIPLET / 2**30
            if mining != "batch_hard" and need > 0.7 * _available_gib():
                (t_ours,) = _interleaved([ours], device, repeats)
                print(f"{mining:<12}{f'{p} x {k}':>12}{n:>7}{t_ours * 1e3:>13.1f}{'-':>11}{'-':>9}  "
                      f"PML: skipped (would need {need:.0f} GiB)")
                continue
            peer = _pml_triplet(mining, margin)
            with torch.no_grad():
                a, b = float(ours()), float(peer(x, y))
            check = f"equal ({a:.6f})" if abs(a - b) <= 1e-4 * max(1.0, abs(b)) else f"ours {a:.6f}, PML {b:.6f}"
            if mining == "semi_hard":
                check += " (different rule)"
            t_peer, t_ours = _interleaved([lambda: peer(x, y), ours], device, repeats)
            print(f"{mining:<12}{f'{p} x {k}':>12}{n:>7}{t_ours * 1e3:>13.1f}{t_peer * 1e3:>11.1f}{t_peer / t_ours:>8.1f}x  {check}")


def _peak_case(args) -> None:
    """Child process: one fewsight forward + backward; prints JSON {seconds, peak_mib}."""
    device = torch.device(args.device)
    x, y = _triplet_batch(args.peak_n // args.peak_k, args.peak_k, args.triplet_d, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark
    t0 = time.perf_counter()
    F.triplet_loss(x, y, margin=0.2, mining=args.peak_case, normalize=True).backward()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mib("VmHWM:") - base
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def peak_section(args) -> None:
    n, d = args.peak_n, args.triplet_d
    print(f"\nPeak memory of one forward + backward, N={n}, D={d} (fresh process per case; "
          f"{'max_memory_allocated' if args.device == 'cuda' else 'peak RSS (VmHWM) above the inputs'})")
    print(f"{'mining':<12}{'P x K':>12}{'fwd+bwd s':>11}{'peak MiB':>10}  PML")
    for k in (4, 32):
        p = n // k
        for mining in MININGS:
            cmd = [sys.executable, os.path.abspath(__file__), "--peak-case", mining, "--peak-n", str(n),
                   "--peak-k", str(k), "--triplet-d", str(d), "--device", args.device, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            if mining == "batch_hard":
                pml = f"not run (its N x N float32 matrices alone: {3 * n * n * 4 / 2**30:.0f} GiB)"
            else:
                pml = f"skipped (would need {n * (k - 1) * (n - k) * PML_BYTES_PER_TRIPLET / 2**30:,.0f} GiB)"
            print(f"{mining:<12}{f'{p} x {k}':>12}{r['seconds']:>11.1f}{r['peak_mib']:>10.1f}  {pml}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--classes", type=int, default=1024, help="classes for the center loss")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--sections", default="basic,triplet,peak", help="comma-separated: basic, triplet, peak")
    p.add_argument("--triplet-d", type=int, default=64)
    p.add_argument("--peak-n", type=int, default=32768)
    p.add_argument("--peak-k", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--peak-case", choices=MININGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_case:
        _peak_case(args)
        return
    sections = set(args.sections.split(","))

    import pytorch_metric_learning
    import pytorch_ood
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    from pytorch_ood.loss import CenterLoss as OODCenterLoss

    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    print(
        f"torch {torch.__version__}, pytorch-metric-learning {pytorch_metric_learning.__version__}, "
        f"pytorch-ood {getattr(pytorch_ood, '__version__', '?')}, fewsight {fs.__version__}; {hw}; "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}"
    )
    if "basic" in sections:
        basic_section(args, device, pml_losses, pml_miners, OODCenterLoss)
    if "triplet" in sections:
        triplet_section(device, args.triplet_d, args.repeats)
    if "peak" in sections:
        peak_section(args)


def basic_section(args, device, pml_losses, pml_miners, OODCenterLoss) -> None:
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
