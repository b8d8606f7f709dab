"""COCO / VOC / YOLO / CSV readers and writers: round trips, format details, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fewsight.data import COCODataset, CSVDataset, DigitsDataset, VOCDataset, YOLODataset, collate_detection, export_dataset, load_image, write_coco, write_csv, write_voc, write_yolo
from fewsight.data.export import EXPORT_FORMATS
from fewsight.errors import DataError, InvalidArgumentError

CLASSES = ["cat", "dog", "bird"]
SIZES = [(20, 30), (24, 16), (32, 32)]  # (H, W)
TARGETS = [
    {"boxes": torch.tensor([[1.0, 2.0, 11.0, 12.0], [10.5, 0.0, 30.0, 20.0]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    {"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]), "labels": torch.tensor([1])},
]
NAMES = ["a.png", "b.png", "c.png"]


def _save_images(folder: Path) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for name, (h, w) in zip(NAMES, SIZES):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
        arrays.append(arr)
    return arrays


def _write(fmt: str, root: Path, targets=TARGETS, classes=CLASSES):
    """Write the tiny dataset in ``fmt``; return a zero-arg reader factory taking reader kwargs."""
    if fmt == "coco":
        _save_images(root)
        ann = write_coco(root / "ann.json", NAMES, SIZES, targets, classes)
        return lambda **kw: COCODataset(ann, **kw)
    if fmt == "voc":
        _save_images(root / "JPEGImages")
        write_voc(root / "Annotations", NAMES, SIZES, targets, classes)
        return lambda **kw: VOCDataset(root, **({"classes": classes} | kw))
    if fmt == "yolo":
        _save_images(root / "images")
        write_yolo(root / "labels", NAMES, SIZES, targets, classes)
        return lambda **kw: YOLODataset(root / "images", **kw)
    _save_images(root / "imgs")
    path = write_csv(root / "ann.csv", [f"imgs/{n}" for n in NAMES], targets, classes)
    return lambda **kw: CSVDataset(path, **({"classes": classes} | kw))


FORMATS = list(EXPORT_FORMATS)  # every format the registry can write


def _image_file(fmt: str, root: Path, name: str) -> Path:
    return {"coco": root, "voc": root / "JPEGImages", "yolo": root / "images", "csv": root / "imgs"}[fmt] / name


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(fmt, tmp_path):
    arrays = _save_images(tmp_path / "_ref")
    ds = _write(fmt, tmp_path)()
    assert ds.classes == CLASSES and len(ds) == 3
    assert ds.num_skipped == 0 and ds.num_boxes_clipped == 0 and ds.num_boxes_dropped == 0
    for i in range(3):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, *SIZES[i])
        assert torch.equal(image, torch.from_numpy(arrays[i]).permute(2, 0, 1).float() / 255)
        torch.testing.assert_close(target["boxes"], TARGETS[i]["boxes"], atol=1e-4, rtol=0)
        assert torch.equal(target["labels"], TARGETS[i]["labels"])
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert ds.image_size(i) == SIZES[i] and ds.image_path(i).name == NAMES[i]
        assert torch.equal(ds.get_target(i)["labels"], target["labels"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_digits_round_trip(fmt, tmp_path):
    src = DigitsDataset("val", num_images=3, image_size=64, digit_size=(16, 32), classes=(2, 5, 7))
    out = export_dataset(src, tmp_path, fmt=fmt)
    reader = {"coco": COCODataset, "voc": VOCDataset, "yolo": YOLODataset, "csv": CSVDataset}[fmt]
    back = reader(out, classes=src.classes) if fmt in ("voc", "csv") else reader(out)
    assert back.classes == src.classes and len(back) == len(src)
    for i in range(len(src)):
        (a, ta), (b, tb) = src[i], back[i]
        assert (a - b).abs().max() <= 0.5 / 255 + 1e-6  # PNG quantisation only
        torch.testing.assert_close(tb["boxes"], ta["boxes"], atol=1e-4, rtol=0)
        assert torch.equal(tb["labels"], ta["labels"])


def test_dataloader_over_reader(tmp_path):
    ds = _write("coco", tmp_path)()
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_detection)))
    assert [tuple(im.shape[1:]) for im in images] == SIZES and len(targets) == 3


# -- format details ----------------------------------------------------------------------------------
def test_coco_category_ids_crowd_and_subset(tmp_path):
    _save_images(tmp_path)
    data = {
        "images": [{"id": 10, "file_name": "a.png"}, {"id": 11, "file_name": "b.png"}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 3, 4]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [5, 5, 10, 10]},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    ds = COCODataset(ann)
    assert ds.classes == ["cat", "dog"] and ds.category_ids == [3, 7] and ds.image_ids == [10, 11]
    t = ds.get_target(0)
    assert t["boxes"].tolist() == [[1, 2, 4, 6], [5, 5, 15, 15]] and t["labels"].tolist() == [1, 0]
    assert ds.num_crowd == 1 and len(ds.get_target(1)["labels"]) == 0  # image without annotations kept
    sub = COCODataset(ann, classes=["dog"])
    assert sub.classes == ["dog"] and sub.get_target(0)["labels"].tolist() == [0]
    with pytest.raises(InvalidArgumentError, match="horse"):
        COCODataset(ann, classes=["horse"])


def test_voc_one_based_difficult_and_no_objects(tmp_path):
    _save_images(tmp_path / "JPEGImages")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.png</filename>"
        "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>30</xmax><ymax>20</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>1</difficult>"
        "<bndbox><xmin>3</xmin><ymin>3</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        "</annotation>"
    )
    (tmp_path / "Annotations" / "b.xml").write_text("<annotation><filename>b.png</filename></annotation>")
    ds = VOCDataset(tmp_path)
    assert ds.classes == ["dog"]  # inferred from the kept objects
    assert ds.get_target(0)["boxes"].tolist() == [[0, 0, 30, 20]]  # whole image
    assert len(ds.get_target(1)["labels"]) == 0
    hard = VOCDataset(tmp_path, keep_difficult=True, classes=["cat", "dog"])
    assert hard.get_target(0)["labels"].tolist() == [1, 0]
    assert hard.get_target(0)["boxes"][1].tolist() == [2, 2, 9, 9]
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("b\n")
    assert len(VOCDataset(tmp_path, image_set="val", classes=["dog"])) == 1


def test_yolo_normalised_missing_label_polygon_and_class_files(tmp_path):
    _save_images(tmp_path / "images")
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n")
    (labels / "b.txt").write_text("")  # empty: no objects; c.png has no label file at all
    (tmp_path / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    ds = YOLODataset(tmp_path / "images")
    assert ds.classes == ["cat", "dog"] and len(ds) == 3
    t = ds.get_target(0)  # a.png is 30 wide, 20 high
    torch.testing.assert_close(t["boxes"], torch.tensor([[12.0, 6.0, 18.0, 14.0], [3.0, 2.0, 9.0, 6.0]]))
    assert t["labels"].tolist() == [1, 0]
    assert len(ds.get_target(1)["labels"]) == 0 and len(ds.get_target(2)["labels"]) == 0
    (labels / "classes.txt").write_text("x\ny\nz\n")  # label_dir is searched first
    assert YOLODataset(tmp_path / "images").classes == ["x", "y", "z"]
    assert YOLODataset(tmp_path / "images", classes=["p", "q"]).classes == ["p", "q"]


def test_csv_header_detection_and_empty_images(tmp_path):
    _save_images(tmp_path)
    path = tmp_path / "ann.csv"
    path.write_text("a.png,1,2,11,12,dog\nb.png,,,,,\na.png,0,0,5,5,cat\n")
    ds = CSVDataset(path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    assert ds.get_target(0)["labels"].tolist() == [1, 0]  # rows of a.png gathered, order kept
    assert len(ds.get_target(1)["labels"]) == 0
    path.write_text("path,xmin,ymin,xmax,ymax,label\na.png,1,2,11,12,dog\n")
    assert len(CSVDataset(path)) == 1


# -- bad inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_image_raises_or_skips(fmt, tmp_path):
    make = _write(fmt, tmp_path)
    _image_file(fmt, tmp_path, "b.png").unlink()
    if fmt == "yolo":  # YOLO lists the image folder: remove a label's image -> simply absent
        assert len(make()) == 2
        return
    with pytest.raises(DataError, match=r"b\.png.*not found") as info:
        make()
    assert info.value.path.name == "b.png"
    ds = make(on_error="skip")
    assert len(ds) == 2 and ds.num_skipped == 1 and ds.skipped[0].path.name == "b.png"
    assert [ds.image_path(i).name for i in range(2)] == ["a.png", "c.png"]
    assert torch.equal(ds.get_target(1)["labels"], TARGETS[2]["labels"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_image_bytes(fmt, tmp_path):
    make = _write(fmt, tmp_path)
    _image_file(fmt, tmp_path, "c.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"c\.png.*cannot read image"):
        make()
    ds = make(on_error="skip")
    assert len(ds) == 2 and ds.num_skipped == 1 and "c.png" in str(ds.skipped[0])


def test_truncated_image_found_by_verify_or_at_load(tmp_path):
    make = _write("coco", tmp_path)
    f = _image_file("coco", tmp_path, "c.png")
    f.write_bytes(f.read_bytes()[:60])  # header intact, pixel data cut
    ds = make()  # header-only check passes
    with pytest.raises(DataError, match=r"c\.png.*cannot decode"):
        ds[2]
    with pytest.raises(DataError, match=r"c\.png"):
        make(verify_images=True)
    assert make(verify_images=True, on_error="skip").num_skipped == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_boxes_outside_image_clipped_or_dropped_and_counted(fmt, tmp_path):
    targets = [
        {"boxes": torch.tensor([[-5.0, 2.0, 11.0, 40.0], [100.0, 100.0, 120.0, 120.0]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[3.0, 3.0, 3.0, 9.0]]), "labels": torch.tensor([2])},  # zero width
        {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])},
    ]
    ds = _write(fmt, tmp_path, targets=targets)()
    assert ds.num_boxes_clipped == 1 and ds.num_boxes_dropped == 2
    assert ds.get_target(0)["boxes"].tolist() == [[0, 2, 11, 20]] and ds.get_target(0)["labels"].tolist() == [0]
    assert len(ds.get_target(1)["boxes"]) == 0
    assert ds.get_target(2)["boxes"].tolist() == [[1, 1, 9, 9]]


@pytest.mark.parametrize("fmt", ["voc", "csv"])
def test_unknown_class_name(fmt, tmp_path):
    make = _write(fmt, tmp_path)
    with pytest.raises(DataError, match=r"unknown class 'bird'") as info:
        make(classes=["cat", "dog"])
    assert info.value.path.name in {"a.xml", "ann.csv"} and str(info.value.path) in str(info.value)
    ds = make(classes=["cat", "dog"], on_error="skip")
    assert len(ds) == 2 and ds.num_skipped == 1


def test_yolo_unknown_class_id(tmp_path):
    make = _write("yolo", tmp_path)
    with pytest.raises(DataError, match=r"a\.txt: line 2: unknown class id 2"):
        make(classes=["cat", "dog"])
    assert make(classes=["cat", "dog"], on_error="skip").num_skipped == 1


def test_coco_unknown_category_and_image(tmp_path):
    _save_images(tmp_path)
    ann = tmp_path / "ann.json"
    base = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "cat"}]}
    ann.write_text(json.dumps(base | {"annotations": [{"id": 5, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(DataError, match=r"ann\.json: annotation 5: category_id 9 is not among the categories"):
        COCODataset(ann)
    ds = COCODataset(ann, on_error="skip")
    assert len(ds) == 0 and ds.num_skipped == 1
    ann.write_text(json.dumps(base | {"annotations": [{"id": 6, "image_id": 4, "category_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(DataError, match=r"annotation 6: image_id 4"):
        COCODataset(ann)
    ann.write_text(json.dumps(base | {"annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, "x"]}]}))
    with pytest.raises(DataError, match=r"annotation 7: expected bbox"):
        COCODataset(ann)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("{not json", "malformed JSON"),
        ("[]", "expected a JSON object"),
        ('{"images": [], "categories": [{"id": 1, "name": "a"}]}', "no images"),
        ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": []}', "no categories"),
        ('{"images": [{"id": 1, "file_name": "a.png"}]}', "categories"),
    ],
)
def test_coco_bad_annotation_file(text, needle, tmp_path):
    ann = tmp_path / "instances.json"
    ann.write_text(text)
    with pytest.raises(DataError, match=needle) as info:
        COCODataset(ann, on_error="skip")  # nothing to skip: always an error
    assert "instances.json" in str(info.value)


def test_missing_annotation_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: annotation file not found"):
        COCODataset(tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"nope\.csv: annotation file not found"):
        CSVDataset(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"Annotations: annotation folder not found"):
        VOCDataset(tmp_path)
    with pytest.raises(DataError, match=r"images: image folder not found"):
        YOLODataset(tmp_path / "images")
    make = _write("voc", tmp_path)
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\nzzz\n")
    with pytest.raises(DataError, match=r"zzz\.xml: annotation file not found"):
        make(image_set="train")
    assert len(make(image_set="train", on_error="skip")) == 1


def test_empty_csv(tmp_path):
    (tmp_path / "ann.csv").write_text("")
    with pytest.raises(DataError, match=r"ann\.csv: annotation file is empty"):
        CSVDataset(tmp_path / "ann.csv")


@pytest.mark.parametrize(
    "line, needle",
    [
        ("0 0.5 0.5\n", "line 1: expected 'class cx cy w h'"),
        ("0 0.5 0.5 0.1 zz\n", "line 1: expected numbers"),
        ("1.5 0.5 0.5 0.1 0.1\n", "line 1: unknown class id 1.5"),
        ("0 0.5 0.5 0.1 0.1\n-1 0.5 0.5 0.1 0.1\n", "line 2: unknown class id -1"),
    ],
)
def test_yolo_malformed_lines(line, needle, tmp_path):
    _write("yolo", tmp_path)
    (tmp_path / "labels" / "b.txt").write_text(line)
    with pytest.raises(DataError, match=r"b\.txt: " + needle.replace(".", r"\.").replace("(", r"\(")):
        YOLODataset(tmp_path / "images")
    ds = YOLODataset(tmp_path / "images", on_error="skip")
    assert len(ds) == 2 and ds.skipped[0].path.name == "b.txt"


@pytest.mark.parametrize(
    "row, needle",
    [
        ("b.png,1,2,3\n", "line 2: expected 6 columns"),
        ("b.png,1,2,x,4,cat\n", "line 2: expected numbers"),
        ("b.png,1,,3,4,cat\n", "line 2: expected numbers"),
        ("b.png,1,2,3,4,\n", "line 2: empty class name"),
    ],
)
def test_csv_malformed_rows(row, needle, tmp_path):
    _save_images(tmp_path)
    path = tmp_path / "ann.csv"
    path.write_text("a.png,1,2,11,12,cat\n" + row + "c.png,0,0,5,5,cat\n")
    with pytest.raises(DataError, match=r"ann\.csv: " + needle):
        CSVDataset(path)
    ds = CSVDataset(path, on_error="skip")
    assert [ds.image_path(i).name for i in range(len(ds))] == ["a.png", "c.png"] and ds.num_skipped == 1


@pytest.mark.parametrize(
    "xml, needle",
    [
        ("<annotation><object>", "malformed XML"),
        ("<annotation><object><bndbox/></object></annotation>", "object 0: missing <name>"),
        ("<annotation><object><name>cat</name></object></annotation>", r"object 0 \(cat\): missing <bndbox>"),
        (
            "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>a</ymin>"
            "<xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>",
            r"object 0 \(cat\): expected a number in <ymin>, got 'a'",
        ),
    ],
)
def test_voc_malformed_xml(xml, needle, tmp_path):
    make = _write("voc", tmp_path)
    (tmp_path / "Annotations" / "b.xml").write_text(xml)
    with pytest.raises(DataError, match=r"b\.xml: " + needle):
        make()
    assert make(on_error="skip").num_skipped == 1


def test_on_error_choice_and_load_image_errors(tmp_path):
    make = _write("csv", tmp_path)
    with pytest.raises(InvalidArgumentError, match="on_error"):
        make(on_error="ignore")
    with pytest.raises(DataError, match=r"ghost\.png: image file not found"):
        load_image(tmp_path / "ghost.png")


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    Image.fromarray(np.full((4, 5), 128, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((4, 5, 4), 255, np.uint8)).save(tmp_path / "r.png")
    assert load_image(tmp_path / "g.png").shape == (3, 4, 5)
    assert torch.all(load_image(tmp_path / "r.png") == 1.0)
