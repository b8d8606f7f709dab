"""fewsight.fewshot: new classes from a few boxed examples, and the protocols that measure it.

* :func:`sample_support` / :class:`SupportSet` — seeded k-shot support sets.
* :func:`enroll_support`, :func:`enroll_from_dataset` — enrollment without gradient steps.
* :func:`finetune` — optional few steps of the detector's own loss on a balanced support set.
* :class:`CropEmbedder` / :class:`CropRescorer` — a metric-learning network that scores the
  enrolled classes on box crops of the detector's proposals.
* :func:`run_fewshot` and :func:`run_emoji_fewshot` — the k-shot protocols (novel / base AP50,
  mean ± 95% interval over seeds).
"""

from fewsight.fewshot.crop_embedder import CROP_EMBEDDER_FORMAT, CropEmbedder
from fewsight.fewshot.digits import digits_fewshot_datasets
from fewsight.fewshot.rescorer import CropRescorer
from fewsight.fewshot.protocol import (
    FewShotResult,
    SupportSet,
    enroll_from_dataset,
    enroll_support,
    finetune,
    mean_interval,
    run_fewshot,
    sample_support,
)

__all__ = [
    "CROP_EMBEDDER_FORMAT",
    "CropEmbedder",
    "CropRescorer",
    "FewShotResult",
    "SupportSet",
    "digits_fewshot_datasets",
    "enroll_from_dataset",
    "enroll_support",
    "finetune",
    "mean_interval",
    "run_fewshot",
    "sample_support",
]
