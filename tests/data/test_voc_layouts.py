"""Pascal VOC layouts: LabelImg's XML beside the images, ``Annotations/`` + ``JPEGImages/``, ``annotations/`` +
``images/``; a folder of labels in another format is an error naming what it holds, never an empty dataset."""

from __future__ import annotations

import json

import pytest
import torch

from fewsight.cli import main
from fewsight.data import VOCDataset, infer_format, open_dataset, save_image, write_voc
from fewsight.data.voc import voc_layout
from fewsight.errors import DataError
from fewsight.hub import save_model
from fewsight.train import build_model
from fewsight.train.config import ModelConfig
from tests._helpers import one_thread  # noqa: F401  (autouse)
from tests.train._tiny import TINY_MODEL

TARGETS = [
    {"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0], [30.0, 5.0, 45.0, 30.0]]), "labels": torch.tensor([0, 1])},
    {"boxes": torch.tensor([[10.0, 10.0, 30.0, 35.0]]), "labels": torch.tensor([1])},
]
CLASSES = ["0", "1"]


def _labelimg(folder, *, suffix=".jpg", classes_txt=True):
    """LabelImg's default: ``a.jpg`` + ``a.xml`` side by side (and the ``classes.txt`` its YOLO mode leaves)."""
    names = [f"img{i}{suffix}" for i in range(len(TARGETS))]
    g = torch.Generator().manual_seed(0)
    for name in names:
        save_image(torch.rand(3, 40, 50, generator=g), folder / name)
    write_voc(folder, names, [(40, 50)] * len(names), TARGETS, CLASSES)
    if classes_txt:
        (folder / "classes.txt").write_text("0\n1\n")
    return folder


def _check(ds):
    assert len(ds) == 2 and ds.classes == CLASSES
    for i, t in enumerate(TARGETS):
        got = ds.get_target(i)
        assert torch.equal(got["boxes"], t["boxes"]) and torch.equal(got["labels"], t["labels"])
    assert ds[0][0].shape == (3, 40, 50)


def test_labelimg_folder_is_read_as_voc(tmp_path):
    root = _labelimg(tmp_path / "labelimg")
    assert voc_layout(root) == (root, root)
    assert infer_format(root) == "voc"  # not YOLO, despite classes.txt
    _check(open_dataset(root))
    _check(open_dataset(root, "voc", classes=CLASSES))
    _check(VOCDataset(root))


@pytest.mark.parametrize("ann,img", [("Annotations", "JPEGImages"), ("annotations", "images"), (".", "images"),
                                     ("annotations", "JPEGImages")])
def test_folder_layouts(tmp_path, ann, img):
    root = tmp_path / "ds"
    names = ["a.png", "b.png"]
    for name in names:
        save_image(torch.zeros(3, 40, 50), root / img / name)
    write_voc(root / ann, names, [(40, 50)] * 2, TARGETS, CLASSES)
    assert voc_layout(root) == (root / ann, root / img)
    assert infer_format(root) == "voc"
    _check(open_dataset(root))


def test_image_found_by_the_xml_name_when_filename_is_stale(tmp_path):
    root = _labelimg(tmp_path / "renamed", classes_txt=False)
    xml = root / "img0.xml"
    xml.write_text(xml.read_text().replace("<filename>img0.jpg</filename>", "<filename>old.jpg</filename>"))
    _check(VOCDataset(root))


def test_explicit_folders_still_win(tmp_path):
    root = _labelimg(tmp_path / "x", classes_txt=False)
    _check(VOCDataset(root, ann_dir=".", image_dir="."))
    with pytest.raises(DataError, match=r"Annotations: annotation folder not found"):
        VOCDataset(root, ann_dir="Annotations")


def test_a_voc_folder_with_other_labels_names_them(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"Annotations: expected Pascal VOC \*\.xml annotation files, got 1 file.*a\.txt"):
        open_dataset(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no files in"):
        VOCDataset(empty)


def test_yolo_reading_of_a_labelimg_folder_is_refused_naming_the_xml(tmp_path):
    root = _labelimg(tmp_path / "labelimg")
    with pytest.raises(DataError, match=r"expected a YOLO label file .* got none; found .*2 \.xml.*format 'voc'"):
        open_dataset(root, "yolo")


def test_images_with_only_classes_txt_are_refused(tmp_path):
    # LabelImg in YOLO mode before anything is labelled: inferred YOLO (a .txt), but no image has a label.
    root = tmp_path / "unlabelled"
    for i in range(2):
        save_image(torch.zeros(3, 8, 8), root / f"{i}.png")
    (root / "classes.txt").write_text("cat\n")
    with pytest.raises(DataError, match=r"got none; found .*classes\.txt"):
        open_dataset(root)
    (root / "classes.txt").unlink()  # a folder of images alone is no labelled dataset either
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        open_dataset(root)


def test_eval_on_a_labelimg_folder(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(ModelConfig("retinanet", None, {**TINY_MODEL, "score_threshold": 0.0}), CLASSES)
    model_file = save_model(model, tmp_path / "model.pt")
    root = _labelimg(tmp_path / "labelimg")
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(model_file), "--data", str(root), "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mAP50" in printed and "mAP50 n/a" not in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_ground_truth"] == 3 and metrics["num_images"] == 2
    assert main(["eval", "--checkpoint", str(model_file), "--data", str(root), "--format", "voc", "--quiet"]) == 0
