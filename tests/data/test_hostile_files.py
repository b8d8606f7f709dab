"""Hostile files: every reader given truncated, mis-encoded, nested, huge and contradictory files.

The rule under test: a file fewsight cannot read is a ``DataError`` naming it (and the line,
annotation or byte offset where that applies), or with ``on_error="skip"`` a recorded skip; a box
that cannot be a box (non-finite, degenerate, outside the image) is dropped and counted. Never a
raw Pillow / json / codec error, never a silent replacement.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewsight._io import read_json, read_text
from fewsight.data import COCODataset, CSVDataset, VOCDataset, YOLODataset, load_image, open_dataset
from fewsight.data.dataset import read_image_size
from fewsight.data.formats import get_format
from fewsight.data.yolo import MAX_CLASS_ID, read_class_names
from fewsight.errors import DataError, InvalidArgumentError

FORMATS = ("coco", "voc", "yolo", "csv")


# -- helpers ---------------------------------------------------------------------------------------
def _png(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path)
    return path


def _encoded(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


def _dataset(fmt: str, root: Path, image_size: tuple[int, int] = (32, 24)) -> tuple[Path, Path]:
    """A one-image dataset (one box) in ``fmt``; returns ``(path to open, the image file)``."""
    w, h = image_size
    if fmt == "coco":
        img = _png(root / "a.png", image_size)
        ann = root / "ann.json"
        ann.write_text(json.dumps({
            "images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "cat"}],
        }))
        return ann, img
    if fmt == "voc":
        img = _png(root / "JPEGImages" / "a.png", image_size)
        (root / "Annotations").mkdir(parents=True)
        (root / "Annotations" / "a.xml").write_text(_voc_xml("2", "2", "6", "6"))
        return root, img
    if fmt == "yolo":
        img = _png(root / "images" / "a.png", image_size)
        (root / "labels").mkdir(parents=True)
        (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.25 0.25\n")
        (root / "labels" / "classes.txt").write_text("cat\n")
        return root, img
    img = _png(root / "a.png", image_size)
    (root / "ann.csv").write_text("image,x1,y1,x2,y2,class\na.png,1,1,6,6,cat\n")
    return root / "ann.csv", img


def _voc_xml(xmin: str, ymin: str, xmax: str, ymax: str, *, extra: str = "") -> str:
    return (
        "<annotation><filename>a.png</filename>"
        f"<object><name>cat</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>{extra}</annotation>"
    )


def _coco(root: Path, annotations: list, categories: list | None = None, images: list | None = None) -> Path:
    _png(root / "a.png")
    ann = root / "ann.json"
    ann.write_text(json.dumps({
        "images": images if images is not None else [{"id": 1, "file_name": "a.png"}],
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "cat"}],
    }))
    return ann


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# -- images ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, needle",
    [
        (_encoded("PNG")[:30], "cannot read image"),  # header cut
        (_encoded("PNG")[: len(_encoded("PNG")) // 2], "cannot decode image"),  # pixel data cut
        (_encoded("JPEG")[:200], "cannot"),
        (_encoded("JPEG")[: len(_encoded("JPEG")) // 2], "cannot decode image"),
        (b"", "cannot read image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "cannot read image"),
        ("not an image at all, just text".encode(), "cannot read image"),
    ],
    ids=["png-header", "png-half", "jpeg-200", "jpeg-half", "empty", "png-zeros", "text"],
)
def test_truncated_or_foreign_image_is_a_data_error_naming_it(tmp_path, data, needle):
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(DataError, match=needle) as info:
        load_image(path)
    assert info.value.path == path and "bad.png" in _one_line(info)
    with pytest.raises(DataError):
        read_image_size(path, full=True)


@pytest.mark.parametrize("as_error", [False, True], ids=["pillow-warns", "warnings-as-errors"])
@pytest.mark.parametrize("side", [12, 40], ids=["over-limit", "over-twice-limit"])
def test_decompression_bomb_is_a_data_error_in_every_entry_point(tmp_path, monkeypatch, side, as_error):
    # 12x12 = 144 pixels is where Pillow only warns (limit 100); 40x40 is where it refuses.
    bomb = _png(tmp_path / "bomb.png", (side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if as_error else "ignore", Image.DecompressionBombWarning)
        for call in (lambda: load_image(bomb), lambda: read_image_size(bomb)):
            with pytest.raises(DataError, match=r"bomb\.png: cannot read image: expected at most 100 pixels") as info:
                call()
            _one_line(info)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_reader_refuses_a_bomb_or_skips_it(tmp_path, monkeypatch, fmt):
    path, img = _dataset(fmt, tmp_path, image_size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"a\.png: cannot read image: expected at most 100 pixels"):
        open_dataset(path)
    ds = open_dataset(path, on_error="skip")
    assert len(ds) == 0 and ds.num_skipped == 1 and ds.skipped[0].path == img


def test_pillow_bomb_warning_is_not_emitted(tmp_path, monkeypatch, recwarn):
    # 12x12 = 144 pixels: Pillow (limit 100) warns and opens; fewsight's DataError says it instead.
    bomb = _png(tmp_path / "bomb.png", (12, 12))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warnings.simplefilter("always")
    for call in (lambda: load_image(bomb), lambda: read_image_size(bomb)):
        with pytest.raises(DataError, match="expected at most 100 pixels"):
            call()
    assert load_image(bomb, max_pixels=144).shape == (3, 12, 12)  # a larger limit asked for: no warning either
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_reader_takes_max_pixels(tmp_path, fmt):
    path, img = _dataset(fmt, tmp_path, image_size=(10, 10))
    assert "max_pixels" in get_format(fmt).option_names()
    ds = open_dataset(path, max_pixels=100)
    assert len(ds) == 1 and ds.max_pixels == 100 and ds[0][0].shape == (3, 10, 10)
    with pytest.raises(DataError, match=r"a\.png: cannot read image: expected at most 99 pixels, got 10x10"):
        open_dataset(path, max_pixels=99)
    ds = open_dataset(path, max_pixels=99, on_error="skip")
    assert len(ds) == 0 and ds.skipped[0].path == img
    with pytest.raises(InvalidArgumentError, match="max_pixels"):
        open_dataset(path, max_pixels=0)


def test_max_pixels_is_explicit_and_checked(tmp_path):
    img = _png(tmp_path / "a.png", (5, 5))
    assert load_image(img, max_pixels=25).shape == (3, 5, 5)
    with pytest.raises(DataError, match="expected at most 24 pixels, got 5x5 = 25"):
        load_image(img, max_pixels=24)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidArgumentError, match="max_pixels"):
            load_image(img, max_pixels=bad)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_image_in_every_reader(tmp_path, fmt):
    path, img = _dataset(fmt, tmp_path)
    img.write_bytes(img.read_bytes()[:40])
    with pytest.raises(DataError, match=r"a\.png"):
        open_dataset(path, verify_images=True)
    assert open_dataset(path, on_error="skip").num_skipped == 1


# -- JSON ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, needle",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"images": [{"id": 1, "file_na', "malformed JSON at line 1 column"),
        ('{"a": 1,\n "b": }', "malformed JSON at line 2 column"),
        ("   \n", "annotation file is empty"),
        ('{"images": [' + "1" * 5000 + "]}", "cannot parse JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
    ids=["nested-list", "nested-value", "truncated", "syntax", "blank", "huge-int", "not-object"],
)
def test_malformed_json_is_a_data_error_naming_the_file(tmp_path, text, needle):
    ann = tmp_path / "ann.json"
    ann.write_text(text)
    with pytest.raises(DataError, match=needle) as info:
        COCODataset(ann)
    assert info.value.path == ann and len(_one_line(info)) < 400


def test_json_and_text_are_strict_utf8(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_bytes('{"categories": [{"id": 1, "name": "caf'.encode() + b"\xe9" + b'"}]}')  # latin-1 e-acute
    with pytest.raises(DataError, match=r"ann\.json: expected UTF-8 text, got byte\(s\) b'\\xe9.*' at byte offset 38"):
        read_json(ann)
    with pytest.raises(DataError, match="byte offset 38"):
        COCODataset(ann)
    ann.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}')  # a UTF-8 byte-order mark is allowed
    assert read_json(ann) == {"a": 1}
    with pytest.raises(DataError, match="annotation file not found"):
        read_text(tmp_path / "nope.json")


# -- mis-encoded annotation text -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_latin1_annotation_text_is_a_data_error_in_every_reader(tmp_path, fmt):
    path, _ = _dataset(fmt, tmp_path)
    latin1 = "caf\xe9".encode("latin-1")
    if fmt == "coco":
        target = path
        target.write_bytes(target.read_bytes().replace(b'"cat"', b'"' + latin1 + b'"'))
    elif fmt == "voc":
        target = tmp_path / "Annotations" / "a.xml"
        target.write_bytes(_voc_xml("2", "2", "6", "6").encode().replace(b">cat<", b">" + latin1 + b"<"))
    elif fmt == "yolo":
        target = tmp_path / "labels" / "a.txt"
        target.write_bytes(b"0 0.5 0.5 0.25 0.25 # " + latin1 + b"\n")
    else:
        target = path
        target.write_bytes(target.read_bytes().replace(b"cat", latin1))
    with pytest.raises(DataError) as info:
        open_dataset(path)
    assert info.value.path == target
    assert "UTF-8" in str(info.value) or "malformed XML" in str(info.value)


def test_latin1_names_files_are_data_errors(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_bytes(b"cat\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"classes\.txt: expected UTF-8 text.*byte offset 7"):
        read_class_names(names)
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_bytes(b"a\n\xff\n")
    (tmp_path / "Annotations").mkdir()
    with pytest.raises(DataError, match=r"train\.txt: expected UTF-8 text"):
        VOCDataset(tmp_path, image_set="train")


def test_voc_declared_encoding_is_honoured(tmp_path):
    path, _ = _dataset("voc", tmp_path)
    xml = '<?xml version="1.0" encoding="ISO-8859-1"?>' + _voc_xml("2", "2", "6", "6").replace(">cat<", ">caf\xe9<")
    (tmp_path / "Annotations" / "a.xml").write_bytes(xml.encode("latin-1"))
    assert VOCDataset(path).classes == ["caf\xe9"]


# -- nested and huge -------------------------------------------------------------------------------
def test_nested_yaml_and_xml(tmp_path):
    yml = tmp_path / "data.yaml"
    yml.write_text("names: " + "[" * 3000 + "]" * 3000)
    with pytest.raises(DataError, match=r"data\.yaml: expected YAML, got lists or mappings nested too deeply"):
        read_class_names(yml)
    yml.write_text("names: [[a, b], c]")
    with pytest.raises(DataError, match=r"data\.yaml: expected class names as text"):
        read_class_names(yml)
    path, _ = _dataset("voc", tmp_path / "voc")
    deep = "<x>" * 50_000 + "</x>" * 50_000  # deep but well formed: read, the objects are still found
    (tmp_path / "voc" / "Annotations" / "a.xml").write_text(_voc_xml("2", "2", "6", "6", extra=deep))
    assert len(VOCDataset(path).get_target(0)["boxes"]) == 1


def test_xml_entity_expansion_is_refused(tmp_path):
    path, _ = _dataset("voc", tmp_path)
    ents = '<!ENTITY a0 "aaaaaaaaaa">' + "".join(
        f'<!ENTITY a{i} "{("&a" + str(i - 1) + ";") * 10}">' for i in range(1, 10)
    )
    xml = f'<?xml version="1.0"?><!DOCTYPE annotation [{ents}]>' + _voc_xml("2", "2", "6", "6").replace(
        ">cat<", ">&a9;<"
    )
    (tmp_path / "Annotations" / "a.xml").write_text(xml)
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"a\.xml: malformed XML"):
        VOCDataset(path)
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("token", ["1000000000000", str(MAX_CLASS_ID + 1), "1e400", "nan", "-3", "2.5"])
def test_yolo_huge_or_bad_class_id_without_names_file(tmp_path, token):
    path, _ = _dataset("yolo", tmp_path)
    (tmp_path / "labels" / "classes.txt").unlink()
    (tmp_path / "labels" / "a.txt").write_text(f"0 0.5 0.5 0.2 0.2\n{token} 0.5 0.5 0.25 0.25\n")
    t = time.perf_counter()
    with pytest.raises(DataError, match=rf"a\.txt: line 2: unknown class id .*0\.\.{MAX_CLASS_ID}") as info:
        YOLODataset(tmp_path / "images")
    assert time.perf_counter() - t < 2  # nothing proportional to the id
    _one_line(info)
    ds = YOLODataset(tmp_path / "images", on_error="skip")
    assert ds.num_skipped == 1 and len(ds.classes) < 10


def test_yolo_class_id_beyond_the_names_file(tmp_path):
    path, _ = _dataset("yolo", tmp_path)
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.25 0.25\n")
    with pytest.raises(DataError, match=r"a\.txt: line 2: unknown class id 1: expected an integer in 0\.\.0 \(1 classes\)"):
        open_dataset(path)


# -- COCO: iscrowd, duplicate names, malformed ids -------------------------------------------------
@pytest.mark.parametrize("flag", ["0", "1", 2, -1, None, [0], "true"])
def test_coco_iscrowd_other_than_0_or_1_is_a_data_error(tmp_path, flag):
    ann = _coco(tmp_path, [{"id": 42, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": flag}])
    with pytest.raises(DataError, match=r"ann\.json: annotation 42: expected iscrowd 0 or 1 \(or false / true\)") as info:
        COCODataset(ann)
    _one_line(info)
    ds = COCODataset(ann, on_error="skip")
    assert len(ds) == 0 and ds.num_skipped == 1 and ds.num_crowd == 0


@pytest.mark.parametrize("flag, crowd", [(0, 0), (1, 1), (False, 0), (True, 1), (0.0, 0), ("absent", 0)])
def test_coco_iscrowd_accepted_values(tmp_path, flag, crowd):
    a = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}
    if flag != "absent":
        a["iscrowd"] = flag
    ds = COCODataset(_coco(tmp_path, [a]))
    assert ds.num_crowd == crowd and len(ds.get_target(0)["boxes"]) == 1 - crowd


@pytest.mark.parametrize(
    "categories, needle",
    [
        ([{"id": 1, "name": "cat"}, {"id": 3, "name": "cat"}], "expected distinct category names, got 'cat' for ids 1 and 3"),
        ([{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}], "duplicate category id 1"),
        ([{"id": 1, "name": ["cat"]}], "malformed category"),
        ([{"id": True, "name": "cat"}], "malformed category"),
        ([{"id": "1", "name": "cat"}], "malformed category"),
    ],
)
def test_coco_contradictory_categories_fail_at_read_time_naming_the_file(tmp_path, categories, needle):
    ann = _coco(tmp_path, [], categories=categories)
    with pytest.raises(DataError, match=r"ann\.json: " + needle) as info:
        COCODataset(ann, on_error="skip")  # structural: raised even when skipping
    _one_line(info)


@pytest.mark.parametrize(
    "annotation, needle",
    [
        ({"id": 5, "image_id": [1], "category_id": 1, "bbox": [1, 1, 5, 5]}, r"annotation 5: image_id \[1\] is not among"),
        ({"id": 5, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]}, "annotation 5: image_id 99 is not among"),
        ({"id": 5, "image_id": 1, "category_id": {"a": 1}, "bbox": [1, 1, 5, 5]}, "category_id .* is not among"),
        ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5]}, "expected bbox"),
        ({"id": 5, "image_id": 1, "category_id": 1, "bbox": ["1", 1, 5, 5]}, "expected bbox"),
        ("not an object", "malformed annotation"),
    ],
)
def test_coco_contradictory_annotations(tmp_path, annotation, needle):
    ann = _coco(tmp_path, [annotation])
    with pytest.raises(DataError, match=needle) as info:
        COCODataset(ann)
    _one_line(info)


def test_coco_unhashable_or_huge_image_entries(tmp_path):
    for images, needle in (
        ([{"id": [1], "file_name": "a.png"}], "malformed image entry"),
        ([{"id": 1, "file_name": "a.png", "x": "y" * 100_000}, {"id": 1, "file_name": "a.png"}], "duplicate image id 1"),
        ([{"id": 1, "file_name": ["a.png"] * 10_000}], "malformed image entry"),
    ):
        with pytest.raises(DataError, match=needle) as info:
            COCODataset(_coco(tmp_path, [], images=images))
        assert len(_one_line(info)) < 400  # what the file holds is quoted, bounded


# -- CSV -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, needle",
    [
        ("a.png,1,1,6,cat\na.png,1,1,6,6,cat\n", "line 1: expected 6 columns"),  # short first row
        ("a.png,1,1,6\n", "line 1: expected 6 columns"),
        ("a.png,1,x,6,6,cat\n", r"line 1: expected numbers x1,y1,x2,y2, got .*a header row names the columns"),
        ("path,a,b,c,d,label\na.png,1,1,6,6,cat\n", "line 1: expected numbers"),  # unrecognised header names
        ("image,x1,y1,x2,y2,class\na.png,1,1,6,6,cat\na.png,1,1,6\n", "line 3: expected 6 columns"),
        ("image,x1,y1,x2,y2,class\na.png,1,1,6,6,cat,extra\n", "line 2: expected 6 columns"),
        ('a.png,1,1,6,6,"cat\n', "line 1: cannot parse CSV \\(unexpected end of data\\)"),
    ],
    ids=["short-first", "shorter-first", "bad-first", "odd-header", "short-later", "long", "open-quote"],
)
def test_csv_rows_that_are_not_six_cells_are_data_errors_naming_the_line(tmp_path, text, needle):
    _png(tmp_path / "a.png")
    (tmp_path / "ann.csv").write_text(text)
    with pytest.raises(DataError, match=r"ann\.csv: " + needle) as info:
        CSVDataset(tmp_path / "ann.csv", classes=["cat"])
    _one_line(info)


@pytest.mark.parametrize(
    "first",
    ["image,x1,y1,x2,y2,class", "filename,xmin,ymin,xmax,ymax,label", "Path, X1 , Y1,X2,Y2,Name",
     "\ufeffimage,x_min,y_min,x_max,y_max,class"],
)
def test_csv_header_recognised_by_its_column_names(tmp_path, first):
    _png(tmp_path / "a.png")
    (tmp_path / "ann.csv").write_text(f"{first}\na.png,1,1,6,6,cat\n", encoding="utf-8")
    ds = CSVDataset(tmp_path / "ann.csv")
    assert ds.classes == ["cat"] and len(ds.get_target(0)["boxes"]) == 1


def test_csv_explicit_header_argument_wins(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "ann.csv").write_text("path,a,b,c,d,label\na.png,1,1,6,6,cat\n")
    assert CSVDataset(tmp_path / "ann.csv", header=True).classes == ["cat"]
    (tmp_path / "ann.csv").write_text("a.png,1,1,6,6,cat\n")
    assert len(CSVDataset(tmp_path / "ann.csv", header=False)) == 1


# -- non-finite and contradictory boxes ------------------------------------------------------------
@pytest.mark.parametrize(
    "coords",
    [("2", "2", "inf", "6"), ("-inf", "2", "6", "6"), ("2", "nan", "6", "6"), ("1e999", "2", "6", "6")],
)
def test_voc_non_finite_coordinate_drops_the_box_and_counts_it(tmp_path, coords):
    path, _ = _dataset("voc", tmp_path)
    good = "<object><name>cat</name><bndbox><xmin>3</xmin><ymin>3</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
    (tmp_path / "Annotations" / "a.xml").write_text(_voc_xml(*coords, extra=good))
    ds = VOCDataset(path)
    assert ds.num_boxes_dropped == 1 and ds.num_boxes_clipped == 0
    assert torch.equal(ds.get_target(0)["boxes"], torch.tensor([[2.0, 2.0, 9.0, 9.0]]))


@pytest.mark.parametrize("fmt", ["coco", "csv", "yolo"])
def test_non_finite_boxes_dropped_in_the_other_readers(tmp_path, fmt):
    path, _ = _dataset(fmt, tmp_path)
    if fmt == "coco":
        data = json.loads(path.read_text())
        data["annotations"].append({"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 1, 1, 1]})
        text = json.dumps(data).replace('"bbox": [1, 1, 1, 1]', '"bbox": [Infinity, 1, 5, 5]')
        path.write_text(text)
    elif fmt == "csv":
        path.write_text(path.read_text() + "a.png,1,1,inf,6,cat\na.png,nan,1,6,6,cat\n")
    else:
        label = tmp_path / "labels" / "a.txt"
        label.write_text(label.read_text() + "0 0.5 0.5 inf 0.2\n")
    ds = open_dataset(path)
    assert ds.num_boxes_dropped == (2 if fmt == "csv" else 1) and len(ds.get_target(0)["boxes"]) == 1
    assert torch.isfinite(ds.get_target(0)["boxes"]).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_box_outside_the_image_is_dropped_and_counted(tmp_path, fmt):
    path, _ = _dataset(fmt, tmp_path)  # 32 x 24 image
    if fmt == "coco":
        data = json.loads(path.read_text())
        data["annotations"][0]["bbox"] = [100, 100, 5, 5]
        path.write_text(json.dumps(data))
    elif fmt == "voc":
        (tmp_path / "Annotations" / "a.xml").write_text(_voc_xml("100", "100", "105", "105"))
    elif fmt == "yolo":
        (tmp_path / "labels" / "a.txt").write_text("0 5.0 5.0 0.1 0.1\n")
    else:
        path.write_text("image,x1,y1,x2,y2,class\na.png,100,100,105,105,cat\n")
    ds = open_dataset(path)
    assert ds.num_boxes_dropped == 1 and len(ds.get_target(0)["boxes"]) == 0


@pytest.mark.parametrize("fmt", ["coco", "voc", "csv"])
def test_annotation_naming_a_missing_image(tmp_path, fmt):
    path, img = _dataset(fmt, tmp_path)
    img.unlink()
    with pytest.raises(DataError, match=r"a\.png: image file not found") as info:
        open_dataset(path)
    assert info.value.path == img
    assert open_dataset(path, on_error="skip").num_skipped == 1


def test_valid_files_still_read_the_same(tmp_path):
    for fmt in FORMATS:
        path, _ = _dataset(fmt, tmp_path / fmt)
        ds = open_dataset(path)
        assert ds.classes == ["cat"] and ds.num_skipped == 0 and ds.num_boxes_dropped == 0
        assert ds.get_target(0)["boxes"].shape == (1, 4)
        image = ds[0][0]
        assert image.shape == (3, 24, 32) and np.isclose(float(image[1, 0, 0]), 200 / 255)
