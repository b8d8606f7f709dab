"""Retrieval at scale through fewsight's Gallery: faiss Flat / HNSW / IVF-PQ, memory-mapped loads, Milvus.

    python bench/retrieval_scale.py                                  # 1,000,000 x 128, 10,000 queries, 2 threads
    python bench/retrieval_scale.py --quick                          # smoke run: 50,000 vectors, 1,000 queries
    python bench/retrieval_scale.py --distribution uniform --skip-milvus    # the structureless worst case
    python bench/retrieval_scale.py --embedder runs/emoji_embedder/embedder.pt --emoji-cache runs/emoji_vectors.pt

Data (``--distribution``):

* ``mixture`` (default): a seeded Gaussian mixture on the sphere, the shape of real embeddings (classes are
  clusters). ``--clusters`` (2,000) centres drawn uniformly on the unit sphere; each vector picks a centre
  uniformly at random and is ``normalize(centre + spread * z / sqrt(D))`` with ``z ~ N(0, I_D)``, so its
  noise has norm about ``spread`` (``--spread`` 1.0: cosine to its centre about 0.71, to another vector of
  its cluster about 0.5, to other clusters about 0). Inside a cluster the noise is isotropic in all D
  dimensions (no low-dimensional structure), which is harder than real embeddings.
* ``uniform``: independent uniform unit vectors. No structure at all: the worst case for every ANN index
  (neighbours are barely closer than anything else), reported for reference.

Queries: ``--queries`` more vectors from the same distribution (same centres, new draws), not in the gallery.

Sections, each a Markdown table:

* ``build``: per faiss index (Flat; HNSW32; IVF-PQ re-ranked with exact vectors, ``RFlat``; IVF-PQ codes only)
  built through ``Gallery.add`` in chunks of ``--chunk``: the backend's training and adding seconds
  (``backend.timings``), wall seconds, the size of the index file ``Gallery.save(layout="folder")`` writes,
  RSS growth (after freed heap memory is handed back with ``malloc_trim``: what the gallery keeps) and peak
  RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS before the build.
* ``search``: per index and search knob (``efSearch``, ``nprobe``, ``k_factor``), recall@10 against exact
  search (the fraction of the exact top-10 ids found, exact = the Flat gallery) and queries per second of one
  batched ``Gallery.search(queries, k=10)`` (median of ``--repeats``). The Flat gallery searches all the
  queries once before the first index and again after each index's rows; "× Flat" divides a row's QPS by
  the mean of the two Flat figures around it (same batch, same process, a load change on the shared machine
  moves both). ``faiss QPS``: the same search straight on ``backend.index`` (the Gallery's overhead: query
  checks and normalisation, tie ordering, metadata gathering).
* ``load``: per index (saved with its fastest knob setting of recall >= 0.95, else its most accurate),
  ``Gallery.load(folder)`` vs ``Gallery.load(folder, mmap=True)``: seconds, anonymous
  and file-backed RSS growth, QPS of the first and second search of a mapped index (``--load-queries``),
  and whether the results of both loads equal the in-memory gallery's. The file was just written, so it is in the page cache (a cold
  disk is slower on the first search).
* ``emoji``: real embeddings (``--embedder``, emoji crops of ``data/emoji``, both styles, the product
  embedding: ``CropEmbedder.embed_crops`` with its TTA and whitening); ``--emoji-queries`` held out at
  random as queries, the rest the gallery. A few thousand vectors: a sanity check that the ANN indexes keep
  recall on real data, with ``nlist`` scaled to the size; recall and build figures only (query rates on a
  few thousand vectors say nothing). Skipped with the reason when absent. ``--emoji-cache FILE`` keeps the
  embeddings (about 15 minutes of CPU for the 3,822 crops with TTA on 2 cores) for the next run.
* ``milvus``: the Milvus backend (milvus-lite, a local ``.db`` in a temporary folder) on the first
  ``--milvus-n`` vectors: FLAT (exact) and HNSW (M 32, efConstruction 40, as faiss's HNSW32) at each
  efSearch (``ef``); insert seconds (``Gallery.add``), flush seconds (``Gallery.save``), and the seconds of
  ``release_collection`` + ``load_collection``, where milvus-lite builds each segment's index (before that
  it searches the new rows by brute force); recall@10 against exact, QPS, speed-up over the faiss Flat
  gallery of the same vectors (searched before and after each Milvus index), size of the .db folder.
  milvus-lite 3.x is a pure-Python engine running in this process (a gRPC server thread, Parquet segments,
  one faiss index per segment; FLAT is numpy brute force); a Milvus server behaves differently.

Threads: faiss (OpenMP) and torch use ``--threads``; milvus-lite runs in this process (its faiss shares the
setting). Index files and Milvus databases live in a temporary folder (``--tmp``), removed at the end.
Memory: the data (N x D float32) is held once; the Flat gallery (a second copy) stays for the ground truth
and the speed reference; one approximate index at a time, freed before its plain and mapped loads (about
three copies of the data at the peak: some 2 GiB at 1,000,000 x 128).
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin, on cores shared with other processes. Set before torch and
# faiss load their OpenMP runtime; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import importlib.metadata
import math
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from _env import cpu_name  # bench/ is on sys.path when a script runs
import fewsight as fs
from fewsight.retrieval import Gallery, make_backend

K = 10
MIB = 2**20


# ---------------------------------------------------------------------------------------------- helpers


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _status() -> dict[str, float]:
    """VmRSS / RssAnon / RssFile / VmHWM of this process in MiB (empty off Linux)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def _release() -> None:
    """Collect garbage and hand freed heap memory back to the system, so RSS deltas show new allocations."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, math.nan) - before.get(key, math.nan)


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(seconds, result) of ``fn(*args, **kwargs)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact top-k ids (rows of ``exact``) present in the rows of ``found``."""
    hits = (found[:, :, None] == exact[:, None, :]).any(axis=1)
    return float(hits.mean())


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "—"
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def auto_nlist(n: int) -> int:
    """Power of two nearest 4·sqrt(n), lowered until faiss has 39 training vectors per list."""
    p = 2 ** max(0, round(math.log2(4 * math.sqrt(max(n, 1)))))
    while p > 1 and 39 * p > n:
        p //= 2
    return p


def _pq_m(dim: int, wanted: int) -> int:
    """Largest number of PQ sub-quantisers <= wanted that divides dim."""
    return max(m for m in range(1, min(wanted, dim) + 1) if dim % m == 0)


# ---------------------------------------------------------------------------------------------- data


def make_data(n: int, q: int, dim: int, distribution: str, clusters: int, spread: float, seed: int,
              chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``(float32[n, dim], float32[q, dim])`` unit rows: gallery and held-out queries (see the docstring)."""
    centres = None
    if distribution == "mixture":
        centres = np.random.default_rng([seed, 0]).standard_normal((clusters, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([seed, stream])
        out = np.empty((count, dim), dtype=np.float32)
        for s in range(0, count, chunk):
            m = min(chunk, count - s)
            x = rng.standard_normal((m, dim), dtype=np.float32)
            if centres is not None:
                x *= spread / math.sqrt(dim)
                x += centres[rng.integers(clusters, size=m)]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[s : s + m] = x
        return out

    return draw(n, 1), draw(q, 2)


def emoji_vectors(args: argparse.Namespace) -> tuple[np.ndarray | None, str]:
    """The emoji crops' product embeddings (float32[N, D]) or ``(None, reason)``."""
    if args.emoji_cache and Path(args.emoji_cache).is_file():
        saved = torch.load(args.emoji_cache, weights_only=True)
        if saved.get("items") == args.emoji_items and args.embedder in (None, saved.get("embedder")):
            return saved["embeddings"].numpy(), f"read from {args.emoji_cache} ({saved['source']})"
    if args.embedder is None:
        return None, "no --embedder given"
    if not Path(args.embedder).is_file():
        return None, f"embedder file {args.embedder} not found"
    if not Path(args.emoji_root).is_dir():
        return None, f"emoji data folder {args.emoji_root} not found (make emoji-data)"
    from fewsight.data.emoji import EmojiCrops
    from fewsight.eval.embedding import embed_dataset
    from fewsight.fewshot import CropEmbedder
    from fewsight.hub import load_model

    embedder = load_model(args.embedder, expect=CropEmbedder)
    crops = EmojiCrops(args.emoji_root, "all", "both", size=int(embedder.config["crop_size"]), fill=1.0)
    items = len(crops) if args.emoji_items is None else min(args.emoji_items, len(crops))
    pick = np.random.default_rng(args.seed).permutation(len(crops))[:items]
    subset = torch.utils.data.Subset(crops, sorted(pick.tolist()))
    seconds, (emb, _) = _timed(embed_dataset, embedder, subset, batch_size=64)
    source = (f"{items} of {len(crops)} crops (both styles, {len(crops.classes)} emoji) embedded by {args.embedder} "
              f"in {seconds:.0f} s")
    if args.emoji_cache:
        import io

        from fewsight._io import atomic_write_bytes

        buffer = io.BytesIO()
        torch.save({"embeddings": emb, "source": source, "items": args.emoji_items, "embedder": args.embedder}, buffer)
        atomic_write_bytes(buffer.getvalue(), args.emoji_cache)
    return emb.numpy(), source


# ---------------------------------------------------------------------------------------------- faiss


def build_gallery(spec: str, data: np.ndarray, chunk: int, **options: Any) -> tuple[Gallery, dict[str, Any]]:
    """A faiss gallery of ``data`` added in chunks; its build figures."""
    _release()
    before = _status()
    _reset_peak()
    t0 = time.perf_counter()
    g = Gallery(data.shape[1], backend=make_backend("faiss", index=spec, **options))
    for s in range(0, len(data), chunk):
        g.add(torch.from_numpy(data[s : s + chunk]))
    g.backend.train()  # buffered vectors of an untrained index (fewer than train_size) are trained on here
    wall = time.perf_counter() - t0
    peak = _status().get("VmHWM", math.nan)
    _release()  # transient buffers handed back: the growth is what the gallery keeps
    after = _status()
    timings = dict(g.backend.timings)
    return g, {
        "index": spec, "n": len(data), "build_s": wall, "train_s": timings["train_s"], "add_s": timings["add_s"],
        "train_vectors": int(timings["train_vectors"]), "rss_growth_mib": _delta(after, before, "VmRSS"),
        "peak_rss_mib": peak - before.get("VmRSS", math.nan),
    }


def measure(g: Gallery, queries: torch.Tensor, repeats: int, raw: bool = True) -> dict[str, Any]:
    """QPS of ``g.search`` on all queries (and of its raw faiss index; median of ``repeats``); the ids found."""
    qn = np.ascontiguousarray(F.normalize(queries.float(), dim=1).numpy())
    g.search(queries[:256], K)  # warm-up
    t_gallery, t_raw = [], []
    ids = None
    for _ in range(repeats):
        seconds, result = _timed(g.search, queries, K)
        t_gallery.append(seconds)
        ids = result.indices.numpy()
        if raw:
            t_raw.append(_timed(g.backend.index.search, qn, K)[0])
    q = len(queries)
    return {"qps": q / statistics.median(t_gallery), "faiss_qps": q / statistics.median(t_raw) if t_raw else math.nan,
            "overhead": statistics.median(t_gallery) / statistics.median(t_raw) - 1 if t_raw else math.nan, "ids": ids}


def flat_qps(flat: Gallery, queries: torch.Tensor) -> float:
    """Queries per second of one search of all ``queries`` on the exact gallery (the speed reference)."""
    return len(queries) / _timed(flat.search, queries, K)[0]


def set_speedups(rows: list[dict[str, Any]], before: float, after: float) -> None:
    """Speed-up of each row over the mean of the Flat QPS measured just before and just after its block."""
    reference = (before + after) / 2
    for r in rows:
        r["flat_qps"], r["speedup"] = reference, r["qps"] / reference


def index_plan(args: argparse.Namespace, n: int, dim: int) -> list[tuple[str, str, dict[str, Any], list[dict[str, Any]]]]:
    """(label, factory string, build options, search-knob settings) per approximate index."""
    nlist = args.nlist or auto_nlist(n)
    m = _pq_m(dim, args.pq_m)
    nprobes = sorted({min(p, nlist) for p in args.nprobe})
    hnsw_opts = {} if args.ef_construction is None else {"ef_construction": args.ef_construction}
    return [
        ("HNSW32", "HNSW32", hnsw_opts, [{"ef_search": e} for e in args.ef_search]),
        ("IVF-PQ + RFlat", f"IVF{nlist},PQ{m}x8,RFlat", {},
         [{"nprobe": p, "k_factor": kf} for p in nprobes for kf in args.k_factor]),
        ("IVF-PQ", f"IVF{nlist},PQ{m}", {}, [{"nprobe": p} for p in nprobes]),
    ]


def faiss_section(title: str, data: np.ndarray, queries_np: np.ndarray, args: argparse.Namespace, tmp: Path,
                  with_load: bool, with_speed: bool = True) -> dict[str, Any]:
    """Build, search (and with_load: save / load / mmap) every index on ``data``; prints the tables.

    ``with_speed=False`` (a small gallery): one search per row, recall and build figures only.
    """
    n, dim = data.shape
    queries = torch.from_numpy(queries_np)
    repeats = args.repeats if with_speed else 1
    flat, build = build_gallery("Flat", data, args.chunk, device=args.device)
    builds = [build]
    seconds, result = _timed(flat.search, queries, K)  # the ground truth, and the first Flat timing
    exact = result.indices.numpy()
    flat_runs = [len(queries) / seconds]
    rows = [{"index": "Flat (exact)", "spec": "Flat", "knobs": "—", "recall": 1.0, "qps": flat_runs[0], "speedup": 1.0,
             "flat_qps": math.nan, "faiss_qps": math.nan, "overhead": math.nan}]
    loads: list[dict[str, Any]] = []
    load_q = queries[: args.load_queries]
    if with_load:
        loads.append(load_test("Flat", save_for_load(flat, load_q, tmp, builds[-1]), load_q))
        loads[-1]["knobs"] = "—"
    for label, spec, build_opts, settings in index_plan(args, n, dim):
        g, build = build_gallery(spec, data, args.chunk, device=args.device, **build_opts)
        builds.append(build)
        block = []
        for knobs in settings:
            g.backend.set_search_params(**knobs)
            r = measure(g, queries, repeats)
            block.append({"index": label, "spec": spec, "knobs": ", ".join(f"{k} {v:g}" for k, v in knobs.items()),
                          "recall": recall_at_k(r.pop("ids"), exact), **r})
            speed = f"  {r['qps']:>9,.0f} QPS" if with_speed else ""
            print(f"  {label:<15} {block[-1]['knobs']:<24} recall@10 {block[-1]['recall']:.4f}{speed}", flush=True)
        if with_speed:
            flat_runs.append(flat_qps(flat, queries))  # this block's closing and the next block's opening reference
            set_speedups(block, flat_runs[-2], flat_runs[-1])
        rows += block
        if with_load:
            good = [i for i, r in enumerate(block) if r["recall"] >= 0.95]
            pick = max(good, key=lambda i: block[i]["qps"]) if good else max(range(len(block)), key=lambda i: block[i]["recall"])
            g.backend.set_search_params(**settings[pick])
            saved = save_for_load(g, load_q, tmp, build)
            del g  # the loads below then hold the only copy of this index
            _release()
            loads.append(load_test(label, saved, load_q))
            loads[-1]["knobs"] = block[pick]["knobs"]
        else:
            build["file_mib"] = _save_size(g, tmp / "sizes")
            del g
            _release()
    if not with_load:
        builds[0]["file_mib"] = _save_size(flat, tmp / "sizes")
    del flat
    _release()

    print(f"\n### {title}: build (N = {n:,}, D = {dim}, added in chunks of {args.chunk:,})\n")
    print(_table(
        ["index", "trained on", "train s", "add s", "build s (wall)", "index file MiB", "bytes / vector",
         "RSS growth MiB", "peak RSS above start MiB"],
        [[b["index"], b["train_vectors"] or "—", b["train_s"], b["add_s"], b["build_s"], b["file_mib"],
          b["file_mib"] * MIB / n, b["rss_growth_mib"], b["peak_rss_mib"]] for b in builds]))
    name = lambda r: r["index"] + ("" if r["spec"] == "Flat" or r["index"] == r["spec"] else f" `{r['spec']}`")  # noqa: E731
    if with_speed:
        print(f"\n### {title}: search ({len(queries):,} queries, k = {K}, one batched call, {args.threads} threads, "
              f"median of {repeats}; × Flat: over the mean of Flat searches of all the queries just before and after "
              f"the index's rows, {', '.join(f'{q:,.0f}' for q in flat_runs)} QPS)\n")
        print(_table(
            ["index", "search knobs", "recall@10", "QPS (Gallery)", "× Flat", "Flat QPS (reference)", "QPS (faiss index)",
             "Gallery overhead"],
            [[name(r), r["knobs"], f"{r['recall']:.4f}", r["qps"], r["speedup"], r["flat_qps"], r["faiss_qps"],
              f"{100 * r['overhead']:+.0f}%" if math.isfinite(r["overhead"]) else "—"] for r in rows]))
    else:
        print(f"\n### {title}: recall ({len(queries):,} queries, k = {K})\n")
        print(_table(["index", "search knobs", "recall@10"], [[name(r), r["knobs"], f"{r['recall']:.4f}"] for r in rows]))
    if loads:
        print(f"\n### {title}: load (`Gallery.load(folder)` vs `Gallery.load(folder, mmap=True)`, file in the page cache; "
              f"searches of {len(load_q):,} queries)\n")
        print(_table(
            ["index", "search knobs", "file MiB", "load s", "RssAnon +MiB", "mmap load s", "RssAnon +MiB (mmap)",
             "RssFile +MiB after search", "mapped QPS 1st / 2nd", "same results"],
            [[x["index"], x["knobs"], x["file_mib"], x["load_s"], x["anon_mib"], x["mmap_load_s"], x["mmap_anon_mib"],
              x["mmap_file_mib"], f"{x['mmap_qps_first']:,.0f} / {x['mmap_qps_second']:,.0f}",
              "yes" if x["equal"] else "NO"] for x in loads]))
    return {"builds": builds, "search": rows, "load": loads, "flat_qps_runs": flat_runs}


def _save_size(g: Gallery, folder: Path) -> float:
    path = g.save(folder, layout="folder")
    size = sum(p.stat().st_size for p in path.parent.glob("index-*.faiss")) / MIB
    shutil.rmtree(folder, ignore_errors=True)
    return size


def save_for_load(g: Gallery, queries: torch.Tensor, tmp: Path, build: dict[str, Any]) -> tuple[Path, torch.Tensor]:
    """Save ``g`` with ``layout="folder"`` (sets ``build['file_mib']``); the folder and ``g``'s result ids."""
    folder = tmp / "gallery"
    g.save(folder, layout="folder")
    build["file_mib"] = sum(p.stat().st_size for p in folder.glob("index-*.faiss")) / MIB
    return folder, g.search(queries, K).indices


def load_test(label: str, saved: tuple[Path, torch.Tensor], queries: torch.Tensor) -> dict[str, Any]:
    """Plain and memory-mapped ``Gallery.load`` of a saved folder: seconds, RSS growth, QPS, equal results."""
    folder, reference = saved
    out: dict[str, Any] = {"index": label, "file_mib": sum(p.stat().st_size for p in folder.glob("index-*.faiss")) / MIB}
    _release()
    before = _status()
    out["load_s"], loaded = _timed(Gallery.load, folder)
    out["anon_mib"] = _delta(_status(), before, "RssAnon")
    equal = bool(torch.equal(loaded.search(queries, K).indices, reference))
    del loaded
    _release()
    before = _status()
    out["mmap_load_s"], mapped = _timed(Gallery.load, folder, mmap=True)
    out["mmap_anon_mib"] = _delta(_status(), before, "RssAnon")
    first, result = _timed(mapped.search, queries, K)
    out["mmap_file_mib"] = _delta(_status(), before, "RssFile")
    second = _timed(mapped.search, queries, K)[0]
    out["mmap_qps_first"], out["mmap_qps_second"] = len(queries) / first, len(queries) / second
    out["equal"] = equal and bool(torch.equal(result.indices, reference))
    out["memory_mapped"] = bool(getattr(mapped.backend, "memory_mapped", False))
    del mapped, result
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)
    print(f"  load {label}: {out['load_s']:.2f} s (+{out['anon_mib']:.0f} MiB anon), mmap {out['mmap_load_s']:.2f} s "
          f"(+{out['mmap_anon_mib']:.0f} MiB anon), results {'equal' if out['equal'] else 'DIFFER'}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- milvus


def milvus_section(data: np.ndarray, queries_np: np.ndarray, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n, dim = data.shape
    queries = torch.from_numpy(queries_np)
    flat, _ = build_gallery("Flat", data, args.chunk, device=args.device)
    seconds, result = _timed(flat.search, queries, K)
    exact = result.indices.numpy()
    flat_runs = [len(queries) / seconds]
    rows = [{"index": "faiss Flat (reference)", "params": "—", "knobs": "—", "insert_s": math.nan, "flush_s": math.nan,
             "load_s": math.nan, "recall": 1.0, "qps": flat_runs[0], "speedup": 1.0, "flat_qps": math.nan,
             "db_mib": math.nan}]
    plans = [("FLAT", {}, [{}]), ("HNSW", {"M": 32, "efConstruction": 40}, [{"ef": e} for e in args.ef_search])]
    for index_type, index_params, settings in plans:
        db = tmp / f"milvus_{index_type.lower()}.db"
        backend = make_backend("milvus", index=index_type, uri=str(db), collection="bench",
                               index_params=index_params, search_params=settings[0])
        g = Gallery(dim, backend=backend)
        insert_s = 0.0
        for s in range(0, n, args.chunk):
            insert_s += _timed(g.add, torch.from_numpy(data[s : s + args.chunk]))[0]
        meta = tmp / f"milvus_{index_type.lower()}.pt"
        flush_s = _timed(g.save, meta)[0]
        client = g.backend.client
        # milvus-lite builds a segment's index when the collection is loaded (until then it scans new rows).
        load_s = _timed(lambda: (client.release_collection("bench"), client.load_collection("bench")))[0]
        db_mib = _folder_bytes(db) / MIB
        block = []
        for knobs in settings:
            h = g if knobs == settings[0] else Gallery.load(meta, search_params=knobs)
            r = measure(h, queries, args.repeats, raw=False)
            block.append({"index": f"Milvus {index_type}", "knobs": ", ".join(f"{k} {v}" for k, v in knobs.items()) or "—",
                          "params": ", ".join(f"{k} {v}" for k, v in index_params.items()) or "—", "insert_s": insert_s,
                          "flush_s": flush_s, "load_s": load_s, "recall": recall_at_k(r["ids"], exact), "qps": r["qps"],
                          "db_mib": db_mib})
            print(f"  Milvus {index_type:<5} {block[-1]['knobs']:<8} recall@10 {block[-1]['recall']:.4f}  "
                  f"{r['qps']:>8,.0f} QPS", flush=True)
            if h is not g:
                h.close()
        g.close()
        del g
        _release()
        flat_runs.append(flat_qps(flat, queries))
        set_speedups(block, flat_runs[-2], flat_runs[-1])
        rows += block
    del flat
    _release()
    print(f"\n### Milvus (milvus-lite {_version('milvus-lite')}, local .db): N = {n:,}, {len(queries):,} queries, k = {K}, "
          f"median of {args.repeats}; × faiss Flat: over the mean of the faiss Flat gallery's searches of the same "
          f"queries just before and after each index ({', '.join(f'{q:,.0f}' for q in flat_runs)} QPS)\n")
    print(_table(
        ["index", "build params", "search knobs", "insert s", "flush s", "load (index build) s", "recall@10", "QPS",
         "× faiss Flat", "faiss Flat QPS (reference)", ".db MiB"],
        [[r["index"], r["params"], r["knobs"], r["insert_s"], r["flush_s"], r["load_s"], f"{r['recall']:.4f}", r["qps"],
          r["speedup"], r["flat_qps"], r["db_mib"]] for r in rows]))
    return {"n": n, "rows": rows, "flat_qps_runs": flat_runs}


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="gallery size (default 1,000,000)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2, help="faiss and torch threads (default 2)")
    p.add_argument("--distribution", choices=["mixture", "uniform"], default="mixture")
    p.add_argument("--clusters", type=int, default=2000, help="mixture components (default 2,000)")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm around a centre (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=100_000, help="vectors per Gallery.add call (default 100,000)")
    p.add_argument("--repeats", type=int, default=3, help="timed searches per row, median (default 3)")
    p.add_argument("--device", default="cpu", help="faiss backend device (default cpu; 'auto' uses a GPU build's GPU)")
    p.add_argument("--ef-search", type=lambda s: [int(v) for v in s.split(",")], default=[16, 32, 64, 128, 256],
                   help="HNSW efSearch values (faiss and Milvus), comma-separated")
    p.add_argument("--ef-construction", type=int, default=None, help="faiss HNSW efConstruction (default faiss's 40)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: power of two near 4·sqrt(N))")
    p.add_argument("--pq-m", type=int, default=32, help="PQ sub-quantisers (8 bits each; default 32)")
    p.add_argument("--nprobe", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32, 64])
    p.add_argument("--k-factor", type=lambda s: [float(v) for v in s.split(",")], default=[4.0, 16.0],
                   help="RFlat re-ranking factors (candidates = k_factor x k)")
    p.add_argument("--milvus-n", type=int, default=100_000)
    p.add_argument("--skip-milvus", action="store_true")
    p.add_argument("--skip-load", action="store_true", help="no save / load / mmap section")
    p.add_argument("--load-queries", type=int, default=1000, help="queries searched in the load section (default 1,000)")
    p.add_argument("--embedder", default=None, help="crop embedder file for the emoji section")
    p.add_argument("--emoji-root", default="data/emoji")
    p.add_argument("--emoji-items", type=int, default=None, help="crops embedded (default all 3,822)")
    p.add_argument("--emoji-queries", type=int, default=500)
    p.add_argument("--emoji-cache", default=None, help="file keeping the emoji embeddings between runs")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: N 50,000, 1,000 queries, Milvus at 20,000, 384 emoji crops")
    p.add_argument("--tmp", default=None, help="folder for index files and Milvus databases (default: system temp)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.n, args.queries = 50_000, min(args.queries, 1000)
        args.milvus_n = min(args.milvus_n, 20_000)
        args.emoji_items = min(args.emoji_items or 384, 384)
    args.milvus_n = min(args.milvus_n, args.n)
    if args.dim % _pq_m(args.dim, args.pq_m) or _pq_m(args.dim, args.pq_m) != args.pq_m:
        p.error(f"--pq-m: expected a divisor of --dim {args.dim}, got {args.pq_m}")

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    meta = {
        "command": "python " + shlex.join(sys.argv),
        "versions": {"fewsight": fs.__version__, "faiss": getattr(faiss, "__version__", "?"), "torch": torch.__version__,
                     "numpy": np.__version__, "pymilvus": _version("pymilvus"), "milvus-lite": _version("milvus-lite"),
                     "python": platform.python_version()},
        "cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "data": {"n": args.n, "dim": args.dim, "queries": args.queries, "distribution": args.distribution,
                 "clusters": args.clusters if args.distribution == "mixture" else None,
                 "spread": args.spread if args.distribution == "mixture" else None, "seed": args.seed},
    }
    v = meta["versions"]
    print(f"`{meta['command']}`\n")
    print(f"fewsight {v['fewsight']}, faiss {v['faiss']}, torch {v['torch']}, numpy {v['numpy']}, pymilvus "
          f"{v['pymilvus']}, milvus-lite {v['milvus-lite']}, Python {v['python']}; {meta['cpu']}, {meta['cores']} cores, "
          f"{args.threads} faiss / torch threads (OMP_WAIT_POLICY={meta['omp_wait_policy']}); faiss device {args.device}")
    shape = (f"Gaussian mixture on the sphere, {args.clusters:,} clusters, spread {args.spread:g}"
             if args.distribution == "mixture" else "uniform random unit vectors")
    print(f"data: {args.n:,} x {args.dim} float32 ({shape}, seed {args.seed}); {args.queries:,} held-out queries\n",
          flush=True)

    results: dict[str, Any] = {"meta": meta}
    tmp = Path(tempfile.mkdtemp(prefix="fewsight_bench_", dir=args.tmp))
    try:
        seconds, (data, queries) = _timed(lambda: make_data(args.n, args.queries, args.dim, args.distribution,
                                                            args.clusters, args.spread, args.seed, args.chunk))
        print(f"generated in {seconds:.1f} s; RSS {_status().get('VmRSS', math.nan):,.0f} MiB", flush=True)
        results["synthetic"] = faiss_section(f"Synthetic {shape}", data, queries, args, tmp, with_load=not args.skip_load)
        results["acceptance"] = acceptance(results["synthetic"]["search"], args.n)

        print("\n### Emoji embeddings\n")
        vectors, source = emoji_vectors(args)
        if vectors is None:
            print(f"emoji section skipped: {source}")
            results["emoji"] = {"skipped": source}
        elif len(vectors) < 20 * K:
            print(f"emoji section skipped: {len(vectors)} vectors, too few")
            results["emoji"] = {"skipped": "too few vectors"}
        else:
            nq = min(args.emoji_queries, len(vectors) // 5)
            print(f"{source}; {nq} held out at random as queries")
            order = np.random.default_rng([args.seed, 3]).permutation(len(vectors))
            eq, eg = vectors[order[:nq]], vectors[order[nq:]]
            eargs = argparse.Namespace(**{**vars(args), "nlist": None, "chunk": len(eg)})
            results["emoji"] = faiss_section(f"Emoji embeddings ({len(eg):,} gallery, {len(eq):,} queries)",
                                             np.ascontiguousarray(eg), np.ascontiguousarray(eq), eargs, tmp,
                                             with_load=False, with_speed=False)

        if args.skip_milvus:
            print("\n### Milvus\n\nskipped (--skip-milvus)")
        else:
            print(f"\n### Milvus at {args.milvus_n:,}\n", flush=True)
            results["milvus"] = milvus_section(data[: args.milvus_n], queries, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        from fewsight.eval import write_json

        write_json(results, args.json)
        print(f"\nwrote {args.json}")


def acceptance(rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Issue #16: HNSW or IVF-PQ recall@10 >= 0.95 at >= 20x the Flat index's query rate (on 1M vectors)."""
    good = [r for r in rows if r["spec"] != "Flat" and r["recall"] >= 0.95]
    best = max(good, key=lambda r: r["speedup"], default=None)
    met = best is not None and best["speedup"] >= 20
    where = f"{best['index']} ({best['knobs']}): recall@10 {best['recall']:.4f} at {best['speedup']:.1f}x Flat" if best else \
        "no approximate row reaches recall@10 0.95"
    print(f"\nacceptance (issue #16, asked at N = 1,000,000: recall@10 >= 0.95 at >= 20x Flat QPS), here N = {n:,}: "
          f"{'MET' if met else 'not met'}; "
          f"fastest row with recall >= 0.95: {where}")
    return {"met": met, "best": {k: v for k, v in best.items()} if best else None}


if __name__ == "__main__":
    main()
