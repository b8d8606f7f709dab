"""Batched matching (fewsight.geometry.match) vs torchvision's per-image box_iou + Matcher loop.

The loop is what torchvision's RetinaNet head runs in its loss for every image. Both run in this
process on the same inputs; results are checked equal before timing. Peak memory on CPU is measured
in a fresh child process per method (peak RSS above the inputs), on CUDA with max_memory_allocated.

    python bench/geometry.py                      # CPU: B=8, A=100k, G=20 and a ragged batch
    python bench/geometry.py --device cuda
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
import torchvision
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

import fewsight as fs


def make_inputs(batch: int, anchors: int, gt: int, ragged: bool, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = 1024.0
    xy = torch.rand(anchors, 2, generator=g) * side
    wh = 16 + torch.rand(anchors, 2, generator=g) * 256
    anchor_boxes = torch.cat((xy, xy + wh), dim=1)
    gxy = torch.rand(batch, gt, 2, generator=g) * side
    gwh = 16 + torch.rand(batch, gt, 2, generator=g) * 300
    gt_boxes = torch.cat((gxy, gxy + gwh), dim=2)
    if ragged:
        counts = torch.randint(0, gt + 1, (batch,), generator=g)
        counts[0] = 0  # an image without objects
        valid = torch.arange(gt)[None, :] < counts[:, None]
    else:
        valid = torch.ones(batch, gt, dtype=torch.bool)
    return anchor_boxes.to(device), gt_boxes.to(device), valid.to(device)


def torchvision_loop(anchors, gt_boxes, valid, matcher):
    out = []
    for b in range(gt_boxes.shape[0]):
        gt = gt_boxes[b][valid[b]]
        if gt.numel() == 0:
            out.append(torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device))
            continue
        out.append(matcher(box_iou(gt, anchors)))
    return torch.stack(out)


def fewsight_match(anchors, gt_boxes, valid):
    return fs.geometry.match(anchors, gt_boxes, valid, object_threshold=0.5, background_threshold=0.4, low_quality=True).indices


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_rss_child(method: str, batch: int, anchors: int, gt: int, ragged: bool) -> float:
    """Peak RSS (MiB) above the inputs, in a fresh process so one method's cache can't hide another's."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import geometry as b
a, g, v = b.make_inputs({batch}, {anchors}, {gt}, {ragged}, torch.device('cpu'))
m = b.Matcher(0.5, 0.4, allow_low_quality_matches=True)
fn = (lambda: b.fewsight_match(a, g, v)) if {method!r} == 'fewsight' else (lambda: b.torchvision_loop(a, g, v, m))
fn()  # warm up allocator and code paths
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
base = rss('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS high-water mark
fn()
print(rss('VmHWM:') - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_case(name, batch, anchors, gt, ragged, device, repeats):
    a, g, v = make_inputs(batch, anchors, gt, ragged, device)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    ours = fewsight_match(a, g, v)
    ref = torchvision_loop(a, g, v, matcher)
    # torchvision marks the ignore band -2 and background -1, as we do; they must agree exactly here
    # (no zero-IoU GT is generated at these densities; the test suite covers that case).
    agree = bool(torch.equal(ours, ref))
    t_ours = timeit(lambda: fewsight_match(a, g, v), device, repeats)
    t_tv = timeit(lambda: torchvision_loop(a, g, v, matcher), device, repeats)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fewsight_match(a, g, v)
        mem_ours = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        torchvision_loop(a, g, v, matcher)
        mem_tv = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        mem_ours = _peak_rss_child("fewsight", batch, anchors, gt, ragged)
        mem_tv = _peak_rss_child("torchvision", batch, anchors, gt, ragged)
    return {
        "case": name,
        "B": batch,
        "A": anchors,
        "G": gt,
        "ragged": ragged,
        "equal": agree,
        "fewsight_ms": t_ours * 1e3,
        "torchvision_ms": t_tv * 1e3,
        "speedup": t_tv / t_ours,
        "fewsight_peak_mib": mem_ours,
        "torchvision_peak_mib": mem_tv,
        "memory_ratio": mem_ours / max(mem_tv, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (50 if device.type == "cuda" else 7)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, fewsight {fs.__version__}; {hw}")
    rows = [
        run_case("dense", 8, 100_000, 20, False, device, repeats),
        run_case("ragged", 8, 100_000, 20, True, device, repeats),
        run_case("retinanet-640", 8, fs.geometry.AnchorGenerator().num_anchors((640, 640)), 10, True, device, repeats),
    ]
    print(f"{'case':<14}{'B':>3}{'A':>8}{'G':>4} {'equal':>6} {'fewsight ms':>12} {'torchvision ms':>15} {'speedup':>8} {'peak MiB ours/tv':>18}")
    for r in rows:
        print(
            f"{r['case']:<14}{r['B']:>3}{r['A']:>8}{r['G']:>4} {str(r['equal']):>6} {r['fewsight_ms']:>12.2f} "
            f"{r['torchvision_ms']:>15.2f} {r['speedup']:>7.1f}x {r['fewsight_peak_mib']:>8.1f}/{r['torchvision_peak_mib']:<8.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hw, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
