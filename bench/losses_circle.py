"""Circle loss: fewsight (block-wise engine) vs pytorch-metric-learning's CircleLoss, fwd + bwd.

Same inputs, same m / gamma, same device. Time = best of ``--repeats`` forward+backward runs
after one warm-up (CUDA: synchronised around each run, never inside the loss). Peak memory:
CUDA ``torch.cuda.max_memory_allocated`` above the inputs; CPU the peak RSS (VmHWM) above the
inputs, each method in a fresh child process. A method that runs out of memory is reported as
such (CUDA OOM is caught; a CPU child killed or failing is reported) and the other still runs.

    python bench/losses_circle.py --device cpu --n 4096 --d 128
    python bench/losses_circle.py --device cuda --n 32768 --d 512
    python bench/losses_circle.py --device cuda --n 131072 --d 512 --skip-pml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

import fewsight
from fewsight.losses.circle import circle_loss


def _rss_mib(key: str = "VmRSS") -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_inputs(n: int, d: int, classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()
    y = torch.randint(0, classes, (n,), generator=g).to(device)
    return x, y


def make_fn(method: str, m: float, gamma: float, block_size: int | None):
    if method == "fewsight":
        return lambda x, y: circle_loss(x, y, m=m, gamma=gamma, block_size=block_size)
    from pytorch_metric_learning.losses import CircleLoss

    pml = CircleLoss(m=m, gamma=gamma)
    return lambda x, y: pml(x, y)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or "can't allocate" in str(e)


def measure(method: str, args, device: torch.device) -> dict:
    """Time and peak memory of one method in this process."""
    x, y = make_inputs(args.n, args.d, args.classes, device)
    fn = make_fn(method, args.m, args.gamma, args.block_size)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, loss = [], None
    try:
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mib()
        for i in range(args.repeats + 1):
            x.grad = None
            sync()
            t = time.perf_counter()
            out = fn(x, y)
            out.backward()
            sync()
            if i:  # the first run is a warm-up (allocator, kernels, PML's first-call overhead)
                times.append(time.perf_counter() - t)
            loss = float(out.detach())
            del out
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mib("VmHWM") - base
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not crash
        if not _is_oom(e):
            raise
        if cuda:
            torch.cuda.empty_cache()
        return {"method": method, "status": "out of memory", "error": str(e).splitlines()[0][:200]}
    return {
        "method": method,
        "status": "ok",
        "time_ms": 1e3 * min(times),
        "times_ms": [round(1e3 * t, 2) for t in times],
        "peak_mib": peak,
        "loss": loss,
        "grad_checksum": float(x.grad.double().abs().sum()),
    }


# pytorch-metric-learning's CircleLoss holds about this many bytes per pair on CPU (fp32 matrices,
# masks and pair index tensors; measured at N = 4096: ~1.1 GiB).
_PML_BYTES_PER_PAIR = 70


def _mem_available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_cpu_child(method: str, argv: list[str]) -> dict:
    """CPU: run one method in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", method]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = "killed (likely out of memory)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1:]
        return {"method": method, "status": f"failed: {reason}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    hw = f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        hw += f"; GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}"
    return hw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--classes", type=int, default=None, help="number of classes (default n // 32)")
    ap.add_argument("--m", type=float, default=0.25)
    ap.add_argument("--gamma", type=float, default=256.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=None, help="fewsight tile edge (default automatic)")
    ap.add_argument("--skip-pml", action="store_true")
    ap.add_argument("--force-pml", action="store_true", help="CPU: run PML even if it looks too big for RAM")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.classes = args.classes or max(2, args.n // 32)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)

    if args.child:
        print(json.dumps(measure(args.child, args, device)))
        return

    try:
        import pytorch_metric_learning

        pml_version = pytorch_metric_learning.__version__
    except ImportError:
        pml_version = None
        args.skip_pml = True
    print(f"python {platform.python_version()}, torch {torch.__version__}, fewsight {fewsight.__version__}, "
          f"pytorch-metric-learning {pml_version}")
    print(hardware(device))
    print(f"N={args.n} D={args.d} classes={args.classes} m={args.m} gamma={args.gamma} "
          f"block_size={args.block_size or 'auto'} device={args.device} (fwd+bwd, best of {args.repeats})")

    argv = [a for a in sys.argv[1:] if a not in ("--json", "--force-pml")]
    methods = ["fewsight"] + ([] if args.skip_pml else ["pml"])
    results = {}
    if device.type == "cpu" and "pml" in methods and not args.force_pml:
        # A CPU run that exhausts RAM invokes the kernel's OOM killer, which may hit other processes.
        need = _PML_BYTES_PER_PAIR * args.n * args.n / 2**20
        avail = _mem_available_mib()
        if avail is not None and need > 0.8 * avail:
            methods.remove("pml")
            results["pml"] = {
                "method": "pml",
                "status": f"skipped: would need ~{need / 1024:.0f} GiB, {avail / 1024:.0f} GiB available (--force-pml)",
            }
    for method in methods:
        r = measure(method, args, device) if device.type == "cuda" else measure_cpu_child(method, argv)
        results[method] = r
        if r["status"] == "ok":
            mem = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
            print(f"  {method:9s} {r['time_ms']:10.1f} ms   {mem} +{r['peak_mib']:.0f} MiB   loss {r['loss']:.6f}")
        else:
            print(f"  {method:9s} {r['status']}")
    if "pml" in results and "pml" not in methods:
        print(f"  {'pml':9s} {results['pml']['status']}")
    f, p = results.get("fewsight"), results.get("pml")
    summary = {"args": vars(args), "results": results}
    if f and p and f["status"] == p["status"] == "ok":
        summary["speedup"] = p["time_ms"] / f["time_ms"]
        summary["loss_abs_diff"] = abs(p["loss"] - f["loss"])
        print(f"  speedup (pml / fewsight): {summary['speedup']:.2f}x   |loss diff| {summary['loss_abs_diff']:.2e}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
