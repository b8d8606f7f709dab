"""fewsight.fewshot: new classes from a few boxed examples, and the protocols that measure it.

* :func:`sample_support` / :class:`SupportSet` — seeded k-shot support sets; :func:`tile_support` cuts
  one into the tiles that hold its boxes (support images larger than the model's input).
* :class:`EnrollSettings`, :func:`enroll`, :func:`enroll_support`, :func:`enroll_from_dataset` —
  enrollment without gradient steps, one set of settings for the API and the command line.
* :func:`finetune` — optional few steps of the detector's own loss on a balanced support set.
* :class:`CropEmbedder` / :class:`CropRescorer` — a metric-learning network that scores the
  enrolled classes on box crops of the detector's proposals.
* :func:`run_fewshot` (any datasets), :func:`digits_fewshot_datasets` and :mod:`fewsight.fewshot.emoji`
  — the k-shot protocols (novel / base AP50, mean ± 95% interval over seeds).
"""

from fewsight.fewshot.crop_embedder import CropEmbedder
from fewsight.fewshot.digits import digits_fewshot_datasets
from fewsight.fewshot.enroll import EnrollSettings, enroll, enroll_from_dataset, enroll_support
from fewsight.fewshot.finetune import finetune
from fewsight.fewshot.protocol import FewShotResult, mean_interval, run_fewshot
from fewsight.fewshot.rescorer import CropRescorer
from fewsight.fewshot.support import SupportSet, sample_support, tile_support

__all__ = [
    "CropEmbedder",
    "CropRescorer",
    "EnrollSettings",
    "FewShotResult",
    "SupportSet",
    "digits_fewshot_datasets",
    "enroll",
    "enroll_from_dataset",
    "enroll_support",
    "finetune",
    "mean_interval",
    "run_fewshot",
    "sample_support",
    "tile_support",
]
