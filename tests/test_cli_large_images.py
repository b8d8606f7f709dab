"""Large images on the command line: ``predict --tile`` / ``eval --tile``, ``--max-pixels``, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fewsight.cli import main
from fewsight.data import load_image
from fewsight.errors import DataError
from fewsight.hub import load_model, save_model
from fewsight.models import predict_sliced
from fewsight.train import build_model
from fewsight.train.config import ModelConfig
from tests._helpers import one_thread  # noqa: F401
from tests.train._tiny import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny untrained RetinaNet that resizes its input to 64 px (so a 2,000 px tile is cheap to run)."""
    torch.manual_seed(0)
    # untrained: a score threshold of 0 keeps candidates, so that outputs are compared on something
    model = build_model(ModelConfig("retinanet", None, {**TINY_MODEL, "max_size": 64, "score_threshold": 0.0}),
                        ["0", "1"])
    return save_model(model, tmp_path_factory.mktemp("model") / "model.pt")


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fewsight {command}: ") and "\n" not in err, err
    return err


# The memory bound: a 10,000 x 10,000 RGB image is 286 MiB as uint8 and 1,144 MiB as the float32
# tensor fewsight.data.load_image returns. Decoding it costs Pillow's own copy (4 bytes a pixel, 381 MiB)
# plus the uint8 result; tiles are views and each batch of tiles is converted on its own. Measured
# growth of the peak RSS: about 750 MiB (the same command without --tile: about 3,480 MiB). The bound,
# 1 GiB, is below the float tensor alone.
MEMORY_BOUND_MIB = 1024

_MEASURE = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(2)
    import fewsight.cli, fewsight.cli.predict, fewsight.data, fewsight.eval, fewsight.hub, fewsight.models
    import matplotlib.figure, matplotlib.backends.backend_agg

    def status(key):  # KiB
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    # the RSS now (not the peak so far, which import-time transients may have raised)
    base = status("VmRSS:")
    rc = fewsight.cli.main(sys.argv[1:])
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so it would report the forking
    # pytest worker's RSS (gigabytes late in a full run) instead of this process's peak.
    print(f"RESULT {rc} {(status('VmHWM:') - base) / 1024:.0f}")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units and /proc differ elsewhere")
def test_predict_tile_on_a_10000_px_image_stays_under_the_memory_bound(model_file, tmp_path):
    big = tmp_path / "big.png"
    im = Image.new("RGB", (10_000, 10_000), (40, 40, 40))
    draw = ImageDraw.Draw(im)
    for k in range(300):  # small bright objects scattered over the canvas
        x, y = (k * 487) % 9_900, (k * 911) % 9_900
        draw.rectangle([x, y, x + 60, y + 40], fill=(230, 230, 230))
    im.save(big, compress_level=1)
    del im, draw
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(model_file), str(big), "--out", str(out), "--tile", "2000",
            "--overlap", "0.1", "--batch-size", "2", "--max-pixels", "100000000", "--max-detections", "500",
            "--quiet"]
    run = subprocess.run([sys.executable, "-c", _MEASURE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stdout + run.stderr
    _, rc, growth = lines[0].split()
    assert rc == "0"
    print(f"peak RSS growth {growth} MiB")
    assert int(growth) < MEMORY_BOUND_MIB, f"peak RSS grew by {growth} MiB"
    result = json.loads((out / "big.json").read_text())
    assert result["image"] == str(big) and len(result["detections"]) <= 500
    assert (out / "big.png").stat().st_size > 0


def test_large_image_needs_max_pixels(model_file, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("L", (10_000, 9_000)).save(big, compress_level=1)  # 90 M pixels: above Pillow's 89.5 M
    assert main(["predict", "--checkpoint", str(model_file), str(big), "--out", str(tmp_path / "o"),
                 "--tile", "512"]) == 1
    err = _error_line(capsys, "predict")
    assert "big.png" in err and "pixels" in err
    assert main(["predict", "--checkpoint", str(model_file), str(big), "--out", str(tmp_path / "o"),
                 "--max-pixels", "1000"]) == 1
    assert "expected at most 1000 pixels" in _error_line(capsys, "predict")


def test_predict_tile_equals_the_library(model_file, tmp_path):
    g = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(g.integers(0, 256, (300, 420, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(model_file), str(path), "--out", str(out), "--tile", "128",
                 "--overlap", "0.25", "--score-threshold", "0", "--max-detections", "40", "--quiet"]) == 0
    got = json.loads((out / "scene.json").read_text())["detections"]
    model = load_model(model_file)
    ref = predict_sliced(model, load_image(path), tile=128, overlap=0.25, batch_size=8, max_detections=40,
                         detections_per_tile=40)
    assert len(got) == len(ref["boxes"]) == 40
    np.testing.assert_allclose([d["box"] for d in got], ref["boxes"].tolist(), atol=0.006)  # JSON rounds
    np.testing.assert_allclose([d["score"] for d in got], ref["scores"].tolist(), atol=6e-5)


def test_predict_max_detections_without_tiles(model_file, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(model_file), str(path), "--out", str(out), "--score-threshold", "0",
                 "--max-detections", "3", "--quiet"]) == 0
    assert len(json.loads((out / "a.json").read_text())["detections"]) == 3


@pytest.mark.parametrize("flags,match", [
    (["--overlap", "0.5"], "--tile"), (["--merge", "nms"], "--tile"), (["--full-image"], "--tile"),
    (["--tile", "0"], "--tile"), (["--tile", "64", "--overlap", "1.0"], "--overlap"),
    (["--max-detections", "0"], "--max-detections"), (["--max-pixels", "-5"], "--max-pixels"),
])
def test_predict_tile_options_refused(model_file, tmp_path, capsys, flags, match):
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 40)).save(path)
    assert main(["predict", "--checkpoint", str(model_file), str(path), "--out", str(tmp_path / "o"), *flags]) == 1
    assert match in _error_line(capsys, "predict")


def test_eval_tile_on_digits(model_file, capsys, tmp_path):
    assert main(["eval", "--checkpoint", str(model_file), "--data", "digits", "--num-images", "2", "--tile", "64",
                 "--overlap", "0.25", "--quiet", "--out", str(tmp_path / "ev")]) == 0
    assert "mAP50" in capsys.readouterr().out
    assert (tmp_path / "ev" / "metrics.json").is_file()
    assert main(["eval", "--checkpoint", str(model_file), "--data", "digits", "--max-pixels", "100"]) == 1
    assert "--max-pixels" in _error_line(capsys, "eval")


def test_eval_max_pixels_reaches_the_reader(model_file, tmp_path, capsys):
    from fewsight.data import write_csv

    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48)).save(image)
    csv = tmp_path / "ann.csv"
    write_csv(csv, [image], [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([0])}], ["0", "1"])
    assert main(["eval", "--checkpoint", str(model_file), "--data", str(csv), "--max-pixels", "100", "--quiet"]) == 1
    assert "expected at most 100 pixels" in _error_line(capsys, "eval")
    assert main(["eval", "--checkpoint", str(model_file), "--data", str(csv), "--max-pixels", "5000", "--tile", "32",
                 "--quiet"]) == 0


def test_eval_tile_reads_image_files_as_uint8(model_file, tmp_path, capsys, monkeypatch):
    import fewsight.data.dataset as dataset
    from fewsight.data import write_csv

    g = np.random.default_rng(3)
    images = []
    for i in range(2):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(g.integers(0, 256, (96, 130, 3), dtype=np.uint8)).save(images[-1])
    csv = tmp_path / "ann.csv"
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    write_csv(csv, images, targets, ["0", "1"])
    dtypes, real = [], dataset.load_image

    def spy(path, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return real(path, **kwargs)

    monkeypatch.setattr(dataset, "load_image", spy)
    metrics = {}
    for tile, out in ((None, "whole"), ("64", "sliced")):
        extra = [] if tile is None else ["--tile", tile, "--overlap", "0.25"]
        assert main(["eval", "--checkpoint", str(model_file), "--data", str(csv), "--quiet", "--out",
                     str(tmp_path / out), *extra]) == 0
        metrics[out] = json.loads((tmp_path / out / "metrics.json").read_text())
    assert torch.float32 in dtypes and torch.uint8 in dtypes
    assert set(dtypes[dtypes.index(torch.uint8):]) == {torch.uint8}  # every image of the sliced run
    assert metrics["whole"]["num_images"] == metrics["sliced"]["num_images"] == 2


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "I;16", "CMYK"])
def test_uint8_decode_equals_load_image(tmp_path, mode):
    g = np.random.default_rng(2)
    rgb = Image.fromarray(g.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray(g.integers(0, 65536, (37, 53), dtype=np.uint16))
    elif mode == "P":
        im = rgb.quantize(16)
    else:
        im = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path)
    got = load_image(path, dtype=None)
    ref = load_image(path)
    if got.dtype == torch.uint8:
        assert torch.equal(got.float().div_(255.0), ref)
    else:
        assert torch.equal(got, ref)


def test_uint8_decode_in_strips(tmp_path, monkeypatch):
    path = tmp_path / "tall.png"
    arr = np.random.default_rng(3).integers(0, 256, (3000, 7000, 3), dtype=np.uint8)  # strips of 798 rows
    Image.fromarray(arr).save(path, compress_level=1)
    got = load_image(path, dtype=None)
    assert got.shape == (3, 3000, 7000) and torch.equal(got.permute(1, 2, 0), torch.from_numpy(arr))


def test_uint8_decode_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(good)
    bad.write_bytes(good.read_bytes()[:2000])  # a truncated file
    with pytest.raises(DataError, match="bad.png"):
        load_image(bad, dtype=None)
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png", dtype=None)
