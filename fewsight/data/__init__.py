"""fewsight.data: detection datasets, readers/writers, transforms and collation.

* :class:`DigitsDataset` — real MNIST digits on cluttered canvases (the default demo data);
  :data:`BASE_CLASSES` (0-7) / :data:`NOVEL_CLASSES` (8, 9).
* :class:`EmojiLogosDataset` — Google / Twitter emoji pasted on scikit-image photographs, with a fixed
  base / novel class split (:func:`emoji_classes`); :class:`EmojiCrops` for metric learning. The
  images come from npm (`make emoji-data`).
* Readers sharing the :class:`DetectionDataset` interface: :class:`COCODataset`,
  :class:`VOCDataset`, :class:`YOLODataset`, :class:`CSVDataset`; writers :func:`write_coco`,
  :func:`write_voc`, :func:`write_yolo`, :func:`write_csv`, and :func:`export_dataset`.
* One registry of formats (:mod:`fewsight.data.formats`): :func:`open_dataset` reads any of
  :data:`FORMATS` (the file formats and the generated datasets) with labels mapped onto given class
  names, :func:`infer_format` tells a path's format, :func:`get_format` returns its
  :class:`DatasetFormat` (reader, writer, detection).
* :func:`apply_class_map` (``open_dataset(..., class_map=)``): rename, merge or drop classes as read.
* :class:`TiledDataset`: tiles of large images (grid tiles or random crops), cut lazily, objects cut
  below ``min_visibility`` given as ignore regions.
* :func:`train_transforms` / :func:`eval_transforms` (torchvision.transforms.v2; :class:`RandomRot90`)
  and :func:`collate_detection` for ``DataLoader``.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from fewsight.data import DigitsDataset, BASE_CLASSES, collate_detection
    >>> ds = DigitsDataset("train", num_images=8, classes=BASE_CLASSES)
    >>> images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_detection)))
    >>> len(images), ds.num_classes
    (4, 8)
"""

from fewsight.data.coco import COCODataset, write_coco
from fewsight.data.collate import collate_detection
from fewsight.data.csvfile import CSVDataset, write_csv
from fewsight.data.dataset import (
    DetectionDataset,
    ImageFileDataset,
    RelabeledDataset,
    load_image,
    save_image,
    unwrap_relabeled,
)
from fewsight.data.digits import (
    BASE_CLASSES,
    DIGIT_CLASSES,
    NOVEL_CLASSES,
    DigitsDataset,
)
from fewsight.data.export import export_dataset
from fewsight.data.formats import FORMATS, DatasetFormat, apply_class_map, get_format, infer_format, open_dataset
from fewsight.data.statistics import dataset_boxes
from fewsight.data.tiled import TiledDataset
from fewsight.data.transforms import RandomRot90, eval_transforms, train_transforms
from fewsight.data.voc import VOC_CLASSES, VOCDataset, write_voc
from fewsight.data.yolo import IMAGE_EXTENSIONS, YOLODataset, write_yolo

__all__ = [
    "BASE_CLASSES",
    "DIGIT_CLASSES",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "NOVEL_CLASSES",
    "VOC_CLASSES",
    "COCODataset",
    "CSVDataset",
    "DatasetFormat",
    "DetectionDataset",
    "DigitsDataset",
    "ImageFileDataset",
    "RandomRot90",
    "RelabeledDataset",
    "TiledDataset",
    "VOCDataset",
    "YOLODataset",
    "apply_class_map",
    "collate_detection",
    "dataset_boxes",
    "eval_transforms",
    "export_dataset",
    "get_format",
    "infer_format",
    "load_image",
    "open_dataset",
    "save_image",
    "train_transforms",
    "unwrap_relabeled",
    "write_coco",
    "write_csv",
    "write_voc",
    "write_yolo",
]

# emoji-logos (Google / Twitter emoji on scikit-image photographs; data via `make emoji-data`).
# Imported on first use (PEP 562): `import fewsight.data` does not load the emoji-logos package (only
# its users need it), and `python -m fewsight.data.emoji` runs the installer warning-free.
_EMOJI_EXPORTS = (
    "EmojiCanvas",
    "EmojiClasses",
    "EmojiCrops",
    "EmojiLogosDataset",
    "emoji_classes",
    "emoji_images",
    "install_emoji",
    "split_base_novel",
)


def __getattr__(name: str) -> object:
    if name in _EMOJI_EXPORTS:
        from fewsight.data import emoji

        return getattr(emoji, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += list(_EMOJI_EXPORTS)
