"""The labelling app's speed: server start, time to the first proposal shown, proposals per second.

    python bench/app.py --checkpoint runs/digits_fewshot/model.pt          # ~2 min on 2 cores

The folder is the digits few-shot protocol's (what ``make app-acceptance`` labels): the seed-0 5-shot support
canvases of 8 and 9 (:func:`fewsight.fewshot.sample_support` over
:func:`fewsight.fewshot.digits_fewshot_datasets`) and the 200 test canvases, 128 x 128 PNG. A real server
(``fewsight app`` in a subprocess) is driven through its HTTP API only:

* start: from launching the process to ``GET /api/status`` answering (imports, model load, folder listing);
* enroll: ``PUT`` the support boxes (the novel digits and the other objects under their known names),
  ``POST /api/enroll``;
* propose: ``POST /api/propose``, then ``GET /api/proposals?limit=1`` polled every 10 ms until a proposal is
  there (what the page can show first), and ``GET /api/propose`` until the run is done: images and
  proposals per second over the run. Re-enrolling drops the proposals, so each repeat proposes the whole
  folder again; medians over ``--repeats``.

Writes ``--out``/results.json. Nothing here changes the app: it measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from _env import cpu_name  # bench/ is on sys.path when a script runs
from fewsight.data import save_image
from fewsight.fewshot import digits_fewshot_datasets, sample_support
from fewsight.hub import load_model
from fewsight.models import DLDENet


def build_folder(checkpoint: str, images: Path, num_test: int) -> dict[str, list[dict]]:
    """Write the support and test canvases; returns the support boxes to draw, by file name."""
    support_ds, test_ds = digits_fewshot_datasets(num_test)
    base = load_model(checkpoint, expect=DLDENet)
    novel = [c for c, n in enumerate(test_ds.classes) if n not in base.classes]
    support = sample_support(support_ds, novel, 5, 0)
    boxes = {}
    for index, target in zip(support.indices, support.targets):
        name = f"support{index:03d}.png"
        save_image(support_ds[index][0], images / name)
        truth = support_ds.get_target(index)["labels"].tolist()
        boxes[name] = [{"box": b, "label": support_ds.classes[k]} for b, k in zip(target["boxes"].tolist(), truth)]
    for i in range(len(test_ds)):
        save_image(test_ds[i][0], images / f"test{i:03d}.png")
    return boxes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, images: Path, project: Path, port: int) -> tuple[subprocess.Popen, float]:
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "fewsight.cli", "app", "--images", str(images), "--checkpoint", args.checkpoint,
           "--project", str(project), "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=2).raise_for_status()
            return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.01)


def propose_once(url: str) -> dict[str, float]:
    t0 = time.perf_counter()
    httpx.post(f"{url}/api/propose", json={}, timeout=60).raise_for_status()
    while httpx.get(f"{url}/api/proposals", params={"limit": 1}, timeout=60).json()["total"] == 0:
        time.sleep(0.01)
    first = time.perf_counter() - t0
    while (p := httpx.get(f"{url}/api/propose", timeout=60).json())["state"] == "running":
        time.sleep(0.05)
    if p["state"] != "done":
        raise SystemExit(f"the proposal run ended in state {p['state']}: {p['error']}")
    high = httpx.get(f"{url}/api/proposals", params={"min_score": 0.5, "limit": 1}, timeout=60).json()["total"]
    return {"first_proposal_s": first, "job_first_proposal_s": p["first_proposal_s"], "run_s": p["elapsed_s"],
            "images": p["run_total"], "proposals": p["proposals"], "proposals_at_least_0.5": high,
            "images_per_s": p["run_total"] / p["elapsed_s"], "proposals_per_s": p["proposals"] / p["elapsed_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/digits_fewshot/model.pt", help="the digits base DLDENet (0-7)")
    ap.add_argument("--num-images", type=int, default=200, help="test canvases (default 200)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: torch's choice)")
    ap.add_argument("--out", default="runs/bench_app")
    args = ap.parse_args()

    import fastapi
    import torchvision
    import uvicorn

    with tempfile.TemporaryDirectory() as tmp:
        images, project = Path(tmp) / "images", Path(tmp) / "project"
        images.mkdir()
        support = build_folder(args.checkpoint, images, args.num_images)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc, start_s = start_server(args, images, project, port)
        try:
            listing = httpx.get(f"{url}/api/images", params={"limit": 1000}, timeout=60).json()["images"]
            ids = {im["name"]: im["id"] for im in listing}
            for name, boxes in support.items():
                httpx.put(f"{url}/api/images/{ids[name]}/annotations", json={"boxes": boxes},
                          timeout=60).raise_for_status()
            runs, enroll_s = [], []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                httpx.post(f"{url}/api/enroll", timeout=600).raise_for_status()
                enroll_s.append(time.perf_counter() - t0)
                runs.append(propose_once(url))
                print(f"run {r}: first proposal after {runs[-1]['first_proposal_s']:.3f} s, "
                      f"{runs[-1]['images_per_s']:.1f} images/s, {runs[-1]['proposals_per_s']:.1f} proposals/s "
                      f"({runs[-1]['images']} images, {runs[-1]['proposals']} proposals)", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    result = {
        "checkpoint": args.checkpoint, "images": runs[0]["images"], "support_images": len(support),
        "repeats": args.repeats, "server_start_s": round(start_s, 3), "enroll_s": round(statistics.median(enroll_s), 3),
        "first_proposal_s": med("first_proposal_s"), "images_per_s": med("images_per_s"),
        "proposals_per_s": med("proposals_per_s"), "proposals": runs[0]["proposals"],
        "proposals_at_least_0.5": runs[0]["proposals_at_least_0.5"], "runs": runs,
        "threads": args.threads or torch.get_num_threads(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"server start {result['server_start_s']:.2f} s; enroll {result['enroll_s']:.2f} s; first proposal "
          f"{result['first_proposal_s']:.3f} s after POST /api/propose; {result['images_per_s']:.1f} images/s, "
          f"{result['proposals_per_s']:.1f} proposals/s over {result['images']} images (median of {args.repeats}); "
          f"{result['cpu']}, {result['threads']} threads; wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
