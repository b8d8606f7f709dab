"""The dataset-format registry: inference per layout, open_dataset round trips, relabeling, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewsight.data import FORMATS, COCODataset, CSVDataset, DatasetFormat, DigitsDataset, EmojiLogosDataset, VOCDataset, YOLODataset, export_dataset, get_format, infer_format, open_dataset
from fewsight.data.digits import LargeDigitsDataset
from fewsight.data.export import EXPORT_FORMATS
from fewsight.errors import DataError, InvalidArgumentError
from tests._fake_emoji import NAMES as EMOJI_NAMES
from tests._fake_emoji import write_fake_emoji

WRITABLE = ["coco", "voc", "yolo", "csv"]


def _digits(classes=(3, 5), n: int = 3) -> DigitsDataset:
    return DigitsDataset("val", num_images=n, image_size=64, digit_size=(16, 32), min_digits=2, classes=classes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[DigitsDataset, Path]]:
    """The same digits (classes "3", "5") written in every writable format."""
    src = _digits()
    root = tmp_path_factory.mktemp("exported")
    return {fmt: (src, export_dataset(src, root / fmt, fmt=fmt)) for fmt in WRITABLE}


def _items(ds) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(t["boxes"], t["labels"]) for _, t in (ds[i] for i in range(len(ds)))]


def _assert_same_targets(a, b) -> None:
    assert len(a) == len(b)
    for (ba, la), (bb, lb) in zip(_items(a), _items(b)):
        torch.testing.assert_close(bb, ba, atol=1e-4, rtol=0)
        assert torch.equal(lb, la)


# -- the registry -----------------------------------------------------------------------------------
def test_registry_lists_every_format_once():
    assert FORMATS == ("digits", "digits_large", "emoji", "coco", "voc", "yolo", "csv")
    assert EXPORT_FORMATS == tuple(WRITABLE)  # export writes what the registry can write
    classes = {"digits": DigitsDataset, "digits_large": LargeDigitsDataset, "emoji": EmojiLogosDataset, "coco": COCODataset, "voc": VOCDataset,
               "yolo": YOLODataset, "csv": CSVDataset}
    for name in FORMATS:
        fmt = get_format(name)
        assert isinstance(fmt, DatasetFormat) and fmt.name == name
        assert fmt.dataset_class is classes[name]
        assert set(fmt.option_names()).isdisjoint(fmt.fixed)
    with pytest.raises(InvalidArgumentError, match=r"format: expected one of .*'digits'.*got 'pascal'"):
        get_format("pascal")


# -- inference --------------------------------------------------------------------------------------
def test_infer_format_of_each_layout(exported, tmp_path, monkeypatch):
    for fmt, (_, path) in exported.items():
        assert infer_format(path) == fmt
        assert infer_format(str(path)) == fmt
    yolo_images = exported["yolo"][1]
    assert yolo_images.name == "images" and infer_format(yolo_images.parent) == "yolo"  # the root works too
    assert infer_format(write_fake_emoji(tmp_path / "emoji_data")) == "emoji"
    monkeypatch.chdir(tmp_path)
    assert infer_format("digits") == "digits" and infer_format("emoji") == "emoji"  # no such folder: built-ins


def test_yolo_labels_beside_images_are_inferred(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    assert infer_format(tmp_path) == "yolo"
    assert open_dataset(tmp_path).classes == ["0"]


@pytest.mark.parametrize(
    "make, got",
    [
        (lambda d: d / "missing.json", "no such file or folder"),
        (lambda d: _touch(d / "labels.txt"), "a file with suffix '.txt'"),
        (lambda d: _mkdir(d / "empty"), "a folder that is none of these"),
        (lambda d: _images_only(d / "pictures"), "a folder that is none of these"),
    ],
    ids=["missing", "txt-file", "empty-folder", "images-without-labels"],
)
def test_unknown_layout_is_an_error_naming_the_path(make, got, tmp_path):
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        infer_format(path)
    assert info.value.path == path and got in info.value.reason
    for expected in ("COCO", ".csv", "Annotations", "YOLO", "emoji.json", "digits"):
        assert expected in info.value.reason
    with pytest.raises(DataError):
        open_dataset(path)


def _touch(p: Path) -> Path:
    p.write_text("0 0.5 0.5 0.1 0.1\n")
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _images_only(p: Path) -> Path:
    p.mkdir()
    Image.new("RGB", (8, 8)).save(p / "a.png")
    return p


# -- reading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", WRITABLE)
def test_round_trip_through_each_writer(fmt, exported):
    src, path = exported[fmt]
    back = open_dataset(path, classes=src.classes)
    assert back.classes == src.classes
    _assert_same_targets(src, back)
    explicit = open_dataset(path, fmt, classes=src.classes)
    assert type(explicit) is type(back) and explicit.classes == back.classes
    _assert_same_targets(back, explicit)


@pytest.mark.parametrize("fmt", WRITABLE)
def test_classes_map_a_subset_onto_a_longer_list(fmt, exported):
    src, path = exported[fmt]
    model = ["9", "5", "1", "3"]  # a superset in another order
    ds = open_dataset(path, classes=model)
    assert ds.classes == model
    lookup = torch.tensor([model.index(c) for c in src.classes])
    for (_, la), (_, lb) in zip(_items(src), _items(ds)):
        assert torch.equal(lb, lookup[la])
    assert (ds.get_target(0)["labels"] == ds[0][1]["labels"]).all()  # the reader itself is relabeled


@pytest.mark.parametrize("fmt, named", [("coco", "annotations.json"), ("voc", ".xml"), ("yolo", "classes.txt"),
                                        ("csv", "annotations.csv")])
def test_a_class_missing_from_classes_is_an_error_naming_the_file(fmt, named, exported):
    _, path = exported[fmt]
    with pytest.raises(DataError) as info:
        open_dataset(path, classes=["3", "7"])
    assert named in str(info.value.path) and "'5'" in info.value.reason and "['3', '7']" in info.value.reason


def test_yolo_without_names_file_indexes_the_given_classes(tmp_path):
    src = _digits()
    images = export_dataset(src, tmp_path, fmt="yolo")
    (tmp_path / "labels" / "classes.txt").unlink()
    assert open_dataset(images).classes == ["0", "1"]  # the ids are the only names there are
    ds = open_dataset(images, classes=["three", "five"])
    assert ds.classes == ["three", "five"]
    _assert_same_targets(src, ds)
    with pytest.raises(DataError, match=r"unknown class id 1"):
        open_dataset(images, classes=["three"])


def test_own_classes_without_classes(exported):
    for fmt in WRITABLE:
        src, path = exported[fmt]
        assert open_dataset(path).classes == src.classes  # every digit drawn, so no class goes unseen


def test_images_folder_and_options(exported, tmp_path):
    src = _digits()
    ann = export_dataset(src, tmp_path / "a", fmt="coco")
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "images").rename(tmp_path / "b" / "images")
    with pytest.raises(DataError, match="image file not found"):
        open_dataset(ann)
    # The file names are "images/<name>": ``images`` is the folder they are relative to.
    _assert_same_targets(src, open_dataset(ann, images=tmp_path / "b", classes=src.classes))
    skipping = open_dataset(ann, on_error="skip")  # options go to the reader
    assert len(skipping) == 0 and skipping.num_skipped == len(src)

    with pytest.raises(InvalidArgumentError, match=r"images: expected only with the formats \['coco', 'csv'\]"):
        open_dataset(exported["voc"][1], images=tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"options: .*got unknown \['num_images'\]"):
        open_dataset(ann, num_images=3)
    with pytest.raises(InvalidArgumentError, match="classes: expected distinct"):
        open_dataset(ann, classes=["3", "3", "5"])
    with pytest.raises(InvalidArgumentError, match="classes: expected a sequence of class names"):
        open_dataset(ann, classes="35")
    with pytest.raises(InvalidArgumentError, match="path: expected"):
        open_dataset(None)


# -- the generated datasets -----------------------------------------------------------------------
def test_digits_take_their_options(tmp_path):
    ds = open_dataset("digits", classes=["8", "9"], split="test", num_images=2, seed=1, image_size=64)
    ref = DigitsDataset("test", 2, classes=["8", "9"], seed=1, image_size=64)
    assert isinstance(ds, DigitsDataset) and ds.classes == ["8", "9"]
    for i in range(2):
        assert torch.equal(ds[i][0], ref[i][0])
    _assert_same_targets(ref, ds)
    assert open_dataset(None, "digits", num_images=1).classes == [str(d) for d in range(10)]
    with pytest.raises(InvalidArgumentError, match="path: expected 'digits'"):
        open_dataset(tmp_path, "digits")


def test_emoji_folder_opens_as_emoji_logos(tmp_path):
    root = write_fake_emoji(tmp_path / "emoji")
    ds = open_dataset(root, classes=EMOJI_NAMES[:3], num_images=2, image_size=96, background="plain")
    ref = EmojiLogosDataset(root, num_images=2, image_size=96, background="plain", classes=EMOJI_NAMES[:3])
    assert isinstance(ds, EmojiLogosDataset) and ds.classes == EMOJI_NAMES[:3]
    assert np.array_equal(ds[1][0].numpy(), ref[1][0].numpy())
    assert open_dataset(root, "emoji", num_images=1, image_size=96, background="plain").num_classes == len(EMOJI_NAMES)
