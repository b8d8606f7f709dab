"""emoji-logos: install (tar safety, idempotence), classes and split, canvases, crops; no npm needed.

Everything runs on a tiny fake data folder with the real layout (``<style>/emoji.json`` +
``<style>/64/<code>.png``); one test uses the real data when ``make emoji-data`` has been run.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fewsight.data import (
    EmojiCrops,
    EmojiLogosDataset,
    collate_detection,
    emoji_classes,
    emoji_images,
    install_emoji,
    split_base_novel,
)
from fewsight.data.emoji import PHOTO_BANDS, SPLITS, STYLES, extract_emoji_tarball, main
from fewsight.data.emoji.rendering import _photo_region
from fewsight.errors import DataError, InvalidArgumentError
from tests._fake_emoji import COLOURS, emoji_entry, write_emoji_install

REAL_ROOT = Path(__file__).resolve().parents[2] / "data" / "emoji"
# Codes deliberately out of order; "1F9FF" is drawn in google only, "1F4A9" lacks its twitter PNG.
CODES = ["1F600", "0023-FE0F-20E3", "1F680", "2764-FE0F", "1F436", "1F34E", "1F3B8", "1F1EB-1F1F7"]
NAMES = ["grinning", "hash", "rocket", "heart", "dog", "apple", "guitar", "flag-fr"]


def _emoji_png(k: int, style: str) -> np.ndarray:
    """A 64x64 RGBA shape per class: opaque rectangle, a faint (alpha 40) 1-px rim, transparent margin."""
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    y0, x0 = 6 + k, 4 + 2 * k
    y1, x1 = 58 - k, 60 - k
    rgba[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = (*COLOURS[style], 40)
    rgba[y0:y1, x0:x1] = (*COLOURS[style], 255)
    rgba[y0 + 4 : y0 + 4 + 3 * (k + 1), x0 + 4 : x0 + 10, :3] = 255  # a class-specific white bar
    return rgba


def _write_fake(root: Path) -> Path:
    entries = [emoji_entry(c, n) for c, n in zip(CODES, NAMES)] + [
        emoji_entry("1F9FF", "nazar_amulet", twitter=False),
        emoji_entry("1F4A9", "poop"),
    ]
    # The two extra classes reuse class 0's drawing; poop's twitter file is left out on purpose.
    return write_emoji_install(root, entries, lambda k, s: _emoji_png(k if k < len(CODES) else 0, s),
                               missing={("twitter", "1F4A9")})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return _write_fake(tmp_path_factory.mktemp("emoji"))


def _same(a, b) -> bool:
    (ia, ta), (ib, tb) = a, b
    return torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


# -- classes ----------------------------------------------------------------------------------------
def test_classes_both_styles_sorted_and_split(root):
    c = emoji_classes(root)
    order = sorted(range(len(CODES)), key=lambda i: CODES[i])
    assert c.unified == tuple(CODES[i] for i in order)
    assert c.names == tuple(NAMES[i] for i in order)
    assert "nazar_amulet" not in c.names and "poop" not in c.names  # one style only
    assert c.files["google"][0] == "0023-fe0f-20e3.png"
    assert not set(c.base) & set(c.novel) and sorted(c.base + c.novel) == list(range(len(CODES)))
    assert len(c.base) == 4 and len(c.novel) == 4
    assert (c.base, c.novel) == split_base_novel(c.unified)
    assert emoji_classes(root) is c  # cached


def test_split_is_fixed_and_seeded():
    codes = [f"{0x1F300 + i:04X}" for i in range(200)]
    base, novel = split_base_novel(codes)
    assert len(base) == 100 and len(novel) == 100 and not set(base) & set(novel)
    assert split_base_novel(list(codes)) == (base, novel)
    # Not the first half of the sorted list, and another seed gives another split.
    assert base != tuple(range(100)) and split_base_novel(codes, seed=1)[0] != base
    # Pinned values: the benchmark's split must not change silently (sha256, machine independent).
    assert split_base_novel(["1F600", "1F601", "1F602", "1F603", "1F604"]) == ((1, 2, 4), (0, 3))


def test_class_selection(root):
    c = emoji_classes(root)
    base = EmojiLogosDataset(root, num_images=20, classes="base", background="plain")
    assert base.classes == [c.names[i] for i in c.base] and base.class_indices == c.base
    labels = torch.cat([base[i][1]["labels"] for i in range(20)])
    assert 0 <= int(labels.min()) and int(labels.max()) < base.num_classes
    novel = EmojiCrops(root, "novel", "google")
    assert novel.classes == [c.names[i] for i in c.novel] and not set(novel.classes) & set(base.classes)
    picked = EmojiLogosDataset(root, num_images=1, classes=["rocket", 0], background="plain")
    assert picked.classes == ["rocket", c.names[0]] and picked.unified == ("1F680", c.unified[0])
    for bad in (["no_such_emoji"], [99], [0, 0], [], [True]):
        with pytest.raises(InvalidArgumentError, match="classes"):
            EmojiCrops(root, bad)
    with pytest.raises(InvalidArgumentError, match="style"):
        EmojiCrops(root, "all", "apple")


# -- missing data -----------------------------------------------------------------------------------
def test_missing_data_says_make_emoji_data(tmp_path):
    half = tmp_path / "half"
    (half / "google").mkdir(parents=True)
    (half / "google" / "emoji.json").write_text("[]")
    for where in (tmp_path / "absent", half):
        for make in (emoji_classes, EmojiLogosDataset, EmojiCrops):
            with pytest.raises(DataError) as info:
                make(where)
            msg = str(info.value)
            assert "make emoji-data" in msg and "\n" not in msg and str(where) in msg


def test_corrupt_catalogue_and_image_name_the_file(tmp_path):
    bad = _write_fake(tmp_path / "bad")
    (bad / "twitter" / "emoji.json").write_text("{not json")
    with pytest.raises(DataError, match="twitter/emoji.json"):
        emoji_classes(bad)
    broken = _write_fake(tmp_path / "broken")
    (broken / "twitter" / "64" / "1f680.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="1f680.png"):
        emoji_images(broken, "twitter")


# -- detection canvases -----------------------------------------------------------------------------
def test_canvas_types_and_determinism(root):
    ds = EmojiLogosDataset(root, "train", num_images=8, image_size=(96, 128), emoji_size=(12, 40), seed=3)
    image, target = ds[0]
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    again = EmojiLogosDataset(root, "train", num_images=8, image_size=(96, 128), emoji_size=(12, 40), seed=3)
    forward = [ds[i] for i in range(8)]
    backward = [again[i] for i in reversed(range(8))][::-1]
    assert all(_same(x, y) for x, y in zip(forward, backward))
    assert _same(ds[-1], ds[7])
    other = {
        "seed": EmojiLogosDataset(root, "train", num_images=1, image_size=(96, 128), emoji_size=(12, 40), seed=4),
        "split": EmojiLogosDataset(root, "val", num_images=1, image_size=(96, 128), emoji_size=(12, 40), seed=3),
    }
    assert not torch.equal(ds[0][0], ds[1][0])
    assert all(not torch.equal(ds[0][0], o[0][0]) for o in other.values())


def test_canvas_independent_of_num_workers(root):
    ds = EmojiLogosDataset(root, "test", num_images=4, image_size=64, emoji_size=(10, 30), seed=5)
    direct = [ds[i] for i in range(4)]
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_detection)
    loaded = [(img, tgt) for images, targets in loader for img, tgt in zip(images, targets)]
    assert all(_same(x, y) for x, y in zip(direct, loaded))


def test_boxes_tight_inside_and_nothing_leaks(root):
    ds = EmojiLogosDataset(
        root, "val", num_images=25, image_size=(80, 100), emoji_size=(8, 60), max_objects=5, background="plain"
    )
    h, w = ds.image_size
    n_boxes = 0
    for i in range(len(ds)):
        c = ds.render(i, masks=True)
        assert c.masks is not None and len(c.masks) == len(c.boxes) == len(c.labels) == len(c.styles)
        covered = np.zeros((h, w), dtype=bool)
        for box, mask in zip(c.boxes, c.masks):
            x1, y1, x2, y2 = box.astype(int)
            assert np.array_equal(box, box.round())
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)  # tight
            covered[y1:y2, x1:x2] = True
        outside = c.image[~covered]
        if len(outside):
            assert np.all(outside == outside[0])  # plain background: no emoji pixel outside its box
        n_boxes += len(c.boxes)
    assert n_boxes >= 25


def test_overlap_limited(root):
    ds = EmojiLogosDataset(root, num_images=15, image_size=64, emoji_size=(10, 40), max_objects=6, background="plain")
    for i in range(len(ds)):
        b = ds[i][1]["boxes"]
        lt = torch.maximum(b[:, None, :2], b[None, :, :2])
        rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        area = (b[:, 2:] - b[:, :2]).prod(-1)
        iou = inter / (area[:, None] + area[None] - inter)
        iou.fill_diagonal_(0)
        assert float(iou.max()) <= ds.max_overlap + 1e-6


def test_style_selection(root):
    for style, expected in (("google", {0}), ("twitter", {1}), ("both", {0, 1})):
        ds = EmojiLogosDataset(root, num_images=20, image_size=64, emoji_size=(10, 30), style=style, background="plain")
        seen = set(np.concatenate([ds.render(i).styles for i in range(len(ds))]).tolist())
        assert seen == expected, style


def test_photo_background_bands_are_disjoint(root):
    pytest.importorskip("skimage")
    from fewsight.data.emoji import load_photos

    photos = load_photos()
    for photo in photos:
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
        regions = [_photo_region(photo, s) for s in SPLITS]
        along = 2 if photo.shape[1] >= photo.shape[0] else 0
        spans = [(r[along], r[along + 1]) for r in regions]
        assert spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == spans[2][0]
        assert spans[2][1] == photo.shape[1 if along == 2 else 0] and all(a < b for a, b in spans)
    assert PHOTO_BANDS["train"][1] == PHOTO_BANDS["val"][0]
    ds = EmojiLogosDataset(root, "test", num_images=2, image_size=48, emoji_size=(8, 20))
    image, _ = ds[0]
    assert image.shape == (3, 48, 48) and float(image.std()) > 0


def test_argument_checks(root):
    for kwargs in (
        {"split": "dev"},
        {"emoji_size": (2, 10)},
        {"emoji_size": (20, 300)},
        {"min_objects": 0},
        {"max_overlap": 2.0},
        {"background": "noise"},
        {"num_images": -1},
    ):
        with pytest.raises(InvalidArgumentError):
            EmojiLogosDataset(root, **kwargs)


# -- crops ------------------------------------------------------------------------------------------
def test_crops_plain_are_the_png_on_white(root):
    ds = EmojiCrops(root, "all", "both")
    k = len(ds.classes)
    assert len(ds) == 2 * k and ds.labels.tolist() == list(range(k)) * 2
    assert ds.item_styles.tolist() == [0] * k + [1] * k
    for i in (0, k + 3):
        image, label = ds[i]
        assert image.shape == (3, 64, 64) and isinstance(label, int) and label == i % k
        rgba = emoji_images(root, STYLES[ds.item_styles[i]])[ds.class_indices[label]].astype(np.float32) / 255
        expected = 1.0 + rgba[..., 3:] * (rgba[..., :3] - 1.0)
        assert np.allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    red = ds[0][0][:, 30, 30]
    blue = ds[k][0][:, 30, 30]
    assert red[0] > red[2] and blue[2] > blue[0]  # google items drawn in the google style


def test_crops_augmented_deterministic_per_epoch(root):
    ds = EmojiCrops(root, "base", "twitter", size=32, augment=True, repeats=3, seed=1)
    assert len(ds) == 3 * len(ds.classes)
    a = [ds[i][0] for i in range(len(ds))]
    b = [EmojiCrops(root, "base", "twitter", size=32, augment=True, repeats=3, seed=1)[i][0] for i in range(len(ds))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 for x in a)
    assert not torch.equal(a[0], a[len(ds.classes)])  # repeats differ
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], a[0])
    ds.set_epoch(0)
    assert torch.equal(ds[0][0], a[0])
    with pytest.raises(InvalidArgumentError, match="scale"):
        EmojiCrops(root, augment=True, scale=(0.5, 1.5))


# -- installation -----------------------------------------------------------------------------------
def _tarball(path: Path, style: str, extra: list[tarfile.TarInfo] | None = None, evil: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/emoji.json", json.dumps([emoji_entry(CODES[0], NAMES[0])]).encode())
        add("package/README.md", b"ignored")
        buf = io.BytesIO()
        Image.fromarray(_emoji_png(0, style), "RGBA").save(buf, format="PNG")
        add(f"package/img/{style}/64/{CODES[0].lower()}.png", buf.getvalue())
        add(f"package/img/{style}/32/{CODES[0].lower()}.png", buf.getvalue())
        add(f"package/img/{style}/sheets/64.png", buf.getvalue())
        if evil is not None:
            add(evil, b"evil")
        for info in extra or []:
            tar.addfile(info)
    return path


def test_install_from_archives_and_idempotent(tmp_path):
    tarballs = {s: _tarball(tmp_path / f"{s}.tgz", s) for s in STYLES}
    dest = install_emoji(tmp_path / "emoji", tarballs=tarballs)
    for s in STYLES:
        files = sorted(p.relative_to(dest / s).as_posix() for p in (dest / s).rglob("*") if p.is_file())
        assert files == ["64/1f600.png", "SOURCE.txt", "emoji.json"]
    assert emoji_classes(dest).names == ("grinning",)
    assert not list(dest.glob(".*"))  # no partial folder left
    # Second run: nothing is read (a broken archive would raise) and nothing changes.
    (tmp_path / "broken.tgz").write_bytes(b"garbage")
    assert install_emoji(dest, tarballs={s: tmp_path / "broken.tgz" for s in STYLES}) == dest
    assert main(["--install", str(dest)]) == 0
    assert main([]) == 2
    # A half-written style folder of ours is replaced; a foreign folder is never deleted.
    (dest / "google" / "SOURCE.txt").unlink()
    install_emoji(dest, tarballs=tarballs)
    assert (dest / "google" / "SOURCE.txt").is_file()
    foreign = tmp_path / "other"
    (foreign / "twitter").mkdir(parents=True)
    (foreign / "twitter" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an emoji install"):
        install_emoji(foreign, tarballs=tarballs)
    assert (foreign / "twitter" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "evil",
    ["/tmp/fewsight-evil.png", "../evil.png", "package/img/google/64/../../../../evil.png", "package/../x.json"],
)
def test_tar_rejects_unsafe_paths(tmp_path, evil):
    archive = _tarball(tmp_path / "evil.tgz", "google", evil=evil)
    out = tmp_path / "deep" / "out"
    with pytest.raises(DataError, match="unsafe member path"):
        extract_emoji_tarball(archive, out, "google")
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "deep" / "evil.png").exists()
    assert not out.exists()  # refused before writing anything
    with pytest.raises(DataError, match="unsafe"):
        install_emoji(tmp_path / "emoji", styles=["google"], tarballs={"google": archive})
    assert not (tmp_path / "emoji" / "google").exists()


def test_tar_rejects_links_and_non_packages(tmp_path):
    link = tarfile.TarInfo("package/img/google/64/1f601.png")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = _tarball(tmp_path / "link.tgz", "google", extra=[link])
    with pytest.raises(DataError, match="not a regular file"):
        extract_emoji_tarball(archive, tmp_path / "out", "google")
    empty = tmp_path / "empty.tgz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(DataError, match="emoji.json is missing"):
        extract_emoji_tarball(empty, tmp_path / "out2", "google")


# -- real data --------------------------------------------------------------------------------------
@pytest.mark.skipif(not (REAL_ROOT / "twitter" / "emoji.json").is_file(), reason="run `make emoji-data` first")
def test_real_data():
    c = emoji_classes(REAL_ROOT)
    assert len(c.names) == 1911 and (len(c.base), len(c.novel)) == (956, 955)
    assert c.unified == tuple(sorted(c.unified)) and len(set(c.names)) == 1911
    assert [c.names[i] for i in c.novel[:3]] == ["two", "four", "five"]  # the pinned benchmark split
    images = emoji_images(REAL_ROOT, "twitter")
    assert images.shape == (1911, 64, 64, 4) and images[..., 3].max() == 255
    ds = EmojiLogosDataset(REAL_ROOT, "test", num_images=3, classes="novel", style="google")
    image, target = ds[2]
    assert image.shape == (3, 256, 256) and ds.num_classes == 955
    assert len(target["boxes"]) >= 1 and int(target["labels"].max()) < 955
    longer = (target["boxes"][:, 2:] - target["boxes"][:, :2]).amax(dim=1)
    assert bool(((longer >= 16) & (longer <= 80)).all())
