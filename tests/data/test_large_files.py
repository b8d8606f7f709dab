"""Images above Pillow's decompression-bomb limit: ``max_pixels`` decides, TIFF included; ``load_image`` dtypes."""

from __future__ import annotations

import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewsight.data import load_image, open_dataset, write_csv
from fewsight.data.dataset import read_image_size
from fewsight.errors import DataError, InvalidArgumentError

PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS  # 89,478,485: Pillow warns above it and refuses above twice it


def bilevel_tiff(path: Path, width: int, height: int) -> Path:
    """An all-white 1-bit TIFF (one PackBits strip) of any size, written without the image in memory:
    14,000 x 13,000 pixels is 360 KB on disk and 182 MB once Pillow decodes it (a byte a pixel)."""
    row = bytearray()
    left = (width + 7) // 8
    while left:
        n = min(128, left)
        row += bytes([(257 - n) & 0xFF, 0]) if n > 1 else bytes([0, 0])  # a run of n zero bytes (white)
        left -= n
    data = bytes(row) * height
    entries = [(256, 4, width), (257, 4, height), (258, 3, 1), (259, 3, 32773), (262, 3, 0), (273, 4, 0),
               (277, 3, 1), (278, 4, height), (279, 4, len(data))]
    offset = 8 + 2 + 12 * len(entries) + 4  # header, IFD, then the strip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = offset if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data)
    return path


def _no_bomb_warnings(record) -> bool:
    return not [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_tiff_over_twice_pillows_limit_opens_with_max_pixels(tmp_path):
    big = bilevel_tiff(tmp_path / "big.tif", 14_000, 13_000)  # 182 M pixels > 2 x 89.5 M
    with pytest.raises(DataError, match=r"big\.tif: cannot read image: expected at most 89478485 pixels"):
        read_image_size(big)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert read_image_size(big, max_pixels=200_000_000) == (13_000, 14_000)
        # Decoding: Pillow checks the TIFF's buffer size again at load time, past the open.
        assert read_image_size(big, max_pixels=200_000_000, full=True) == (13_000, 14_000)
    assert _no_bomb_warnings(record)
    assert Image.MAX_IMAGE_PIXELS == PILLOW_LIMIT  # restored
    with pytest.raises(DataError, match="expected at most 181999999 pixels, got 14000x13000"):
        read_image_size(big, max_pixels=181_999_999)


@pytest.fixture
def low_limit(monkeypatch):
    """Pillow's limit at 1,000 pixels: a 60 x 50 image (3,000) is over twice it, the path of a 200 M pixel one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    return 1000


@pytest.mark.parametrize("name,mode", [("rgb.tif", "RGB"), ("bits.tif", "1"), ("pal.tif", "P"), ("rgb.png", "RGB"),
                                       ("gray16.tif", "I;16")])
def test_load_image_over_twice_pillows_limit(tmp_path, low_limit, monkeypatch, name, mode):
    g = np.random.default_rng(0)
    rgb = Image.fromarray(g.integers(0, 256, (50, 60, 3), dtype=np.uint8))
    im = {"RGB": rgb, "1": rgb.convert("1"), "P": rgb.quantize(8),
          "I;16": Image.fromarray(g.integers(0, 65536, (50, 60), dtype=np.uint16))}[mode]
    path = tmp_path / name
    im.save(path)
    with pytest.raises(DataError, match="expected at most 1000 pixels"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    reference = load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", low_limit)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = {dtype: load_image(path, max_pixels=3000, dtype=dtype) for dtype in (torch.float32, torch.uint8, None)}
    assert _no_bomb_warnings(record) and Image.MAX_IMAGE_PIXELS == low_limit
    assert torch.equal(got[torch.float32], reference)
    assert got[torch.uint8].dtype == torch.uint8 and got[torch.uint8].is_contiguous()
    if mode == "I;16":  # 16 bits: the uint8 image is rounded, the native one stays float
        assert (got[torch.uint8].float() / 255 - reference).abs().max() <= 0.5 / 255 + 1e-6
        assert torch.equal(got[None], reference)
    else:
        assert torch.equal(got[torch.uint8].float() / 255, reference)
        assert torch.equal(got[None], got[torch.uint8])
    with pytest.raises(DataError, match="expected at most 2999 pixels"):
        load_image(path, max_pixels=2999)


def test_a_dataset_reads_images_over_pillows_limit_with_max_pixels(tmp_path, low_limit):
    Image.new("RGB", (60, 50), (10, 20, 30)).save(tmp_path / "a.tif")
    csv = write_csv(tmp_path / "a.csv", ["a.tif"], [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]),
                                                     "labels": torch.tensor([0])}], ["x"])
    with pytest.raises(DataError, match=r"a\.tif: cannot read image: expected at most 1000 pixels"):
        open_dataset(csv)
    ds = open_dataset(csv, max_pixels=3000)
    image, target = ds[0]
    assert image.shape == (3, 50, 60) and image[2, 0, 0].item() == pytest.approx(30 / 255)
    assert Image.MAX_IMAGE_PIXELS == low_limit


def test_pillows_limit_is_restored_after_a_failed_decode(tmp_path, low_limit):
    good = tmp_path / "good.tif"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(good.read_bytes()[:-4000])  # the pixel data cut
    with pytest.raises(DataError, match=r"bad\.tif"):
        load_image(bad, max_pixels=3000)
    assert Image.MAX_IMAGE_PIXELS == low_limit


def test_concurrent_opens_keep_each_callers_limit(tmp_path, low_limit):
    # Threads raising Pillow's limit for their opens never let a caller without max_pixels read past
    # Pillow's own limit, and the limit comes back when the last one ends.
    path = tmp_path / "a.png"
    Image.new("RGB", (60, 50)).save(path)
    errors: list[BaseException] = []
    refused = []

    def allowed():
        try:
            for _ in range(20):
                assert load_image(path, max_pixels=3000, dtype=torch.uint8).shape == (3, 50, 60)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def default():
        for _ in range(20):
            try:
                load_image(path)
            except DataError as exc:
                refused.append("expected at most 1000 pixels" in str(exc))

    threads = [threading.Thread(target=f) for f in (allowed, allowed, default, allowed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and refused == [True] * 20
    assert Image.MAX_IMAGE_PIXELS == low_limit


def test_load_image_dtype_is_checked(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 3)).save(path)
    with pytest.raises(InvalidArgumentError, match="dtype: expected one of"):
        load_image(path, dtype=torch.float16)
