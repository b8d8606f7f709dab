"""The few-shot detection benchmark on emoji-logos: enroll from Google, test in both styles.

A DLDENet trained on the 956 emoji base classes in both styles (``configs/emoji_base.yaml``) gets a
seeded subset of the novel classes (:func:`emoji_novel_subset`, 50 by default) from ``k`` boxed
examples each, drawn in the **Google** style; it is then tested on scenes of the **same** style
(Google) and of the **other** style (Twitter), reported apart. :func:`emoji_fewshot_datasets` builds
the three datasets over one label list — every base class (in the base model's order) followed by the
novel subset — and :func:`run_emoji_fewshot` runs :func:`~fewsight.fewshot.run_fewshot` on both test
sets with the same seeded support sets, plus, optionally, a fully supervised reference detector
trained on the novel subset alone (``configs/emoji_supervised.yaml``) whose novel AP50 sets the
scale: each k-shot row gets ``novel_ap50 / reference_novel_ap50``.

Test canvases draw their objects uniformly from the novel subset and an equally large seeded subset
of base classes, so about half of the objects are novel. Base AP50 is the mean over the base classes
that have ground truth in the test set (a class without ground truth has no AP and is left out, not
counted as 0).

Subsets are chosen like the base / novel split: classes are ranked by
``sha256(f"{seed}:{purpose}:{unified}")``, the same on every machine and numpy version.

Example (needs the data: ``make emoji-data``):
    >>> novel = emoji_novel_subset("data/emoji", 50, seed=0)  # doctest: +SKIP
    >>> data = emoji_fewshot_datasets("data/emoji", novel)  # doctest: +SKIP
    >>> len(data.classes), data.novel[:2], data.test_styles  # doctest: +SKIP
    (1006, (956, 957), ('google', 'twitter'))
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn
from torch.utils.data import Dataset

from fewsight.data.dataset import RelabeledDataset, Target
from fewsight.data.emoji import DEFAULT_ROOT, STYLES, EmojiLogosDataset, emoji_classes
from fewsight.errors import InvalidArgumentError, check_choice
from fewsight.eval.evaluate import evaluate_model
from fewsight.fewshot.protocol import run_fewshot

__all__ = [
    "EMOJI_SIZE",
    "EmojiFewShotData",
    "base_support_size",
    "check_reference",
    "emoji_base_classes_of",
    "emoji_base_subset",
    "emoji_fewshot_datasets",
    "emoji_novel_subset",
    "evaluate_reference",
    "run_emoji_fewshot",
]

#: Emoji side range of the benchmark's canvases, that of the base training recipe (configs/emoji_base.yaml).
EMOJI_SIZE = (24, 64)

_NOVEL_SALT = "fewshot-novel"
_BASE_SALT = "fewshot-test-base"
_TRAIN_BASE_SALT = "fewshot-train-base"


def _ranked(indices: Sequence[int], unified: Sequence[str], seed: int, salt: str) -> list[int]:
    """``indices`` in a seeded order that depends on neither the machine nor numpy (sha256 of the codes)."""
    return sorted(indices, key=lambda i: hashlib.sha256(f"{seed}:{salt}:{unified[i]}".encode()).digest())


def _check_count(name: str, value: Any, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= high:
        raise InvalidArgumentError(f"{name}: expected an int in [1, {high}], got {value!r}")
    return int(value)


def emoji_novel_subset(root: str | Path = DEFAULT_ROOT, n: int = 50, seed: int = 0) -> tuple[int, ...]:
    """``n`` of the novel classes of :func:`~fewsight.data.emoji_classes`, chosen with ``seed``; sorted indices.

    The indices are into ``emoji_classes(root).names``. Raises :class:`~fewsight.errors.DataError`
    (telling to run ``make emoji-data``) when the data is absent, and
    :class:`~fewsight.errors.InvalidArgumentError` unless ``1 <= n <= len(novel)``.
    """
    catalog = emoji_classes(root)
    n = _check_count("n", n, len(catalog.novel))
    return tuple(sorted(_ranked(catalog.novel, catalog.unified, int(seed), _NOVEL_SALT)[:n]))


def emoji_base_classes_of(classes: Sequence[str], root: str | Path = DEFAULT_ROOT) -> list[int]:
    """Indices into ``emoji_classes(root).names`` of a base model's ``classes``, in the model's order.

    Raises :class:`~fewsight.errors.InvalidArgumentError` when ``classes`` is empty or names a class
    that is not an emoji base class (a model trained on something else).
    """
    catalog = emoji_classes(root)
    index = {catalog.names[i]: i for i in catalog.base}
    names = [str(c) for c in classes]
    not_base = [c for c in names if c not in index]
    if not names or not_base:
        raise InvalidArgumentError(
            f"model: expected a DLDENet over emoji base classes (configs/emoji_base.yaml), got one over "
            f"{len(names)} classes, not base classes: {not_base[:5]}{'...' if len(not_base) > 5 else ''}"
        )
    return [index[c] for c in names]


def emoji_base_subset(root: str | Path = DEFAULT_ROOT, n: int = 100, seed: int = 0) -> tuple[int, ...]:
    """``n`` of the base classes, chosen with ``seed``; sorted indices into ``emoji_classes(root).names``.

    A CPU-sized base training set (``configs/emoji_base.yaml``: 100 classes); the full 956 are for a GPU.
    """
    catalog = emoji_classes(root)
    n = _check_count("n", n, len(catalog.base))
    return tuple(sorted(_ranked(catalog.base, catalog.unified, int(seed), _TRAIN_BASE_SALT)[:n]))


class _Joined(Dataset[tuple[Tensor, Target]]):
    """Datasets over one label list, one after the other (``classes`` kept, unlike ``ConcatDataset``)."""

    def __init__(self, parts: Sequence[Any], classes: Sequence[str]) -> None:
        self.parts = [p for p in parts if len(p) > 0]
        self.classes = list(classes)
        self._ends = np.cumsum([len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        if not 0 <= index < len(self):
            raise IndexError(f"index: expected 0 <= index < {len(self)}, got {index}")
        part = int(np.searchsorted(self._ends, index, side="right"))
        start = self._ends[part - 1] if part else 0
        return self.parts[part][index - start]


@dataclass(frozen=True)
class EmojiFewShotData:
    """The datasets of the emoji few-shot benchmark (see :func:`emoji_fewshot_datasets`).

    ``classes``: the label list, every base class then the novel subset; ``novel``: label indices of
    the novel classes in it; ``test_base``: label indices of the base classes drawn in the test sets;
    ``novel_subset`` / ``base_subset``: the same classes as indices into ``emoji_classes(root).names``;
    ``support``: support canvases over ``classes``; ``test_same`` / ``test_cross``: test canvases in
    ``support_style`` and in the other style; ``tests``: ``{style: test set}``, same style first.
    """

    classes: list[str]
    novel: tuple[int, ...]
    test_base: tuple[int, ...]
    novel_subset: tuple[int, ...]
    base_subset: tuple[int, ...]
    support: Any
    test_same: Any
    test_cross: Any
    support_style: str
    cross_style: str
    image_size: int = 192

    @property
    def base_names(self) -> list[str]:
        return self.classes[: len(self.classes) - len(self.novel)]

    @property
    def novel_names(self) -> list[str]:
        return [self.classes[c] for c in self.novel]

    @property
    def test_styles(self) -> tuple[str, str]:
        return self.support_style, self.cross_style

    @property
    def tests(self) -> dict[str, Any]:
        return {self.support_style: self.test_same, self.cross_style: self.test_cross}


def base_support_size(num_base: int, k: int, objects_per_image: float = 4.0) -> int:
    """Base-class canvases for a balanced ``k``-shot fine-tuning set: ``3k + 10`` instances per class on average.

    With ``num_base`` classes drawn uniformly, a class then falls short of ``k`` with a (Poisson)
    probability below 3e-6 for every ``k`` >= 1 (below 0.3% that any of 956 classes does).
    """
    return math.ceil(num_base * (3 * k + 10) / objects_per_image)


def emoji_fewshot_datasets(
    root: str | Path = DEFAULT_ROOT,
    novel: Sequence[int] | None = None,
    *,
    base: Sequence[int] | None = None,
    num_support: int = 300,
    num_test: int = 300,
    num_base_support: int = 0,
    image_size: int = 192,
    emoji_size: tuple[float, float] = EMOJI_SIZE,
    min_objects: int = 2,
    max_objects: int = 6,
    support_style: str = "google",
    seed: int = 0,
    background: str = "photo",
) -> EmojiFewShotData:
    """Support and test canvases of the emoji few-shot benchmark, relabeled into one class list.

    Args:
        root: the emoji folder (``make emoji-data``).
        novel: the novel classes, indices into ``emoji_classes(root).names`` (default:
            ``emoji_novel_subset(root, 50, seed=0)``); each must be a novel class of the fixed split.
        base: the base classes (the base model's), indices into ``emoji_classes(root).names`` in the
            model's label order (default: all 956 of the split); each must be a base class.
        num_support: support canvases (split ``"train"``, ``support_style``) drawing only novel classes.
        num_test: canvases of each test set (split ``"test"``) drawing the novel classes and an
            equally large subset of base classes (chosen with ``seed``).
        num_base_support: extra support canvases drawing every base class in both styles (split
            ``"train"``, after the novel ones): what fine-tuning's balanced k-shot set samples its
            base instances from (:func:`base_support_size`). 0: none (enrollment needs none).
        image_size, emoji_size, min_objects, max_objects, background: canvas settings
            (:class:`~fewsight.data.EmojiLogosDataset`).
        support_style: style of the novel support examples and of the same-style test set; the
            cross-style test set uses the other style.
        seed: seed of the canvases and of the test base subset.

    Labels: base classes ``0 .. B-1`` in the order of ``base`` (the base model's), then the novel classes
    ``B ..`` in the given order.
    """
    check_choice("support_style", support_style, STYLES)
    catalog = emoji_classes(root)
    if novel is None:
        novel = emoji_novel_subset(root, 50, seed=0)
    novel_subset = tuple(int(c) for c in novel)
    novel_set = set(catalog.novel)
    if not novel_subset or len(set(novel_subset)) != len(novel_subset) or not set(novel_subset) <= novel_set:
        bad = [c for c in novel_subset if c not in novel_set]
        raise InvalidArgumentError(
            f"novel: expected distinct novel-class indices (emoji_classes(root).novel), got {list(novel)}"
            + (f"; not novel: {bad[:10]}" if bad else "")
        )
    for name, value in (("num_support", num_support), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(num_base_support, bool) or not isinstance(num_base_support, int) or num_base_support < 0:
        raise InvalidArgumentError(f"num_base_support: expected an int >= 0, got {num_base_support!r}")
    base = tuple(catalog.base) if base is None else tuple(int(c) for c in base)
    if not base or len(set(base)) != len(base) or not set(base) <= set(catalog.base):
        raise InvalidArgumentError(
            f"base: expected distinct base-class indices (emoji_classes(root).base), got {list(base)[:10]}"
        )
    nb = len(base)
    classes = [catalog.names[i] for i in base] + [catalog.names[i] for i in novel_subset]
    novel_labels = tuple(range(nb, nb + len(novel_subset)))
    base_subset = tuple(sorted(_ranked(base, catalog.unified, int(seed), _BASE_SALT)[: min(len(novel_subset), nb)]))
    base_pos = {c: j for j, c in enumerate(base)}
    canvas = {"image_size": image_size, "emoji_size": tuple(emoji_size), "min_objects": min_objects,
              "max_objects": max_objects, "seed": int(seed), "background": background}

    novel_support = EmojiLogosDataset(root, "train", num_support, classes=list(novel_subset), style=support_style,
                                      **canvas)
    support = RelabeledDataset(novel_support, list(novel_labels), classes)
    if num_base_support:
        base_support = EmojiLogosDataset(root, "train", num_base_support, classes=list(base), style="both",
                                         **{**canvas, "seed": int(seed) + 1})  # other canvases than the novel ones
        support = _Joined([support, RelabeledDataset(base_support, list(range(nb)), classes)], classes)

    # Novel first, then base: a test canvas draws from both, uniformly, so about half its objects are novel.
    test_classes = list(novel_subset) + list(base_subset)
    test_mapping = list(novel_labels) + [base_pos[c] for c in base_subset]
    cross_style = next(s for s in STYLES if s != support_style)
    # One seed for both styles: the two test sets share their layouts (classes, places) as far as the
    # two drawings of an emoji, of slightly different shapes, allow.
    tests = [
        RelabeledDataset(EmojiLogosDataset(root, "test", num_test, classes=test_classes, style=style, **canvas),
                         test_mapping, classes)
        for style in (support_style, cross_style)
    ]
    return EmojiFewShotData(
        classes=classes,
        novel=novel_labels,
        test_base=tuple(base_pos[c] for c in base_subset),
        novel_subset=novel_subset,
        base_subset=base_subset,
        support=support,
        test_same=tests[0],
        test_cross=tests[1],
        support_style=support_style,
        cross_style=cross_style,
        image_size=image_size,
    )


def _mean_ap50(metrics: Mapping[str, Any], names: Sequence[str]) -> float:
    vals = [metrics["per_class"][n]["ap50"] for n in names]
    vals = [v for v in vals if v == v]  # no ground truth: no AP (nan), left out
    return float(np.mean(vals)) if vals else float("nan")


def check_reference(reference: nn.Module, data: EmojiFewShotData) -> list[str]:
    """``reference.classes`` when they are the novel subset's names (any order); else InvalidArgumentError."""
    names = [str(c) for c in getattr(reference, "classes", [])]
    if sorted(names) != sorted(data.novel_names):
        raise InvalidArgumentError(
            f"reference: expected a detector over the {len(data.novel)} novel classes {data.novel_names[:5]}..., "
            f"got {len(names)} classes {names[:5]}{'...' if len(names) > 5 else ''}"
        )
    return names


def evaluate_reference(
    reference: nn.Module,
    data: EmojiFewShotData,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Novel AP50 of a detector trained with full supervision on the novel subset, per test style.

    ``reference.classes`` must be the novel subset's names (any order). Its test targets keep the novel
    boxes only: a detection on a base object is a false positive, as it is for an enrolled class.
    Returns ``{style: {"novel_ap50", "map50", "per_class_ap50"}}``.
    """
    names = check_reference(reference, data)
    lookup = {n: j for j, n in enumerate(names)}
    mapping = [lookup.get(n, -1) for n in data.classes]
    out: dict[str, dict[str, Any]] = {}
    for style, test in data.tests.items():
        metrics = evaluate_model(reference, RelabeledDataset(test, mapping, names), batch_size, class_names=names,
                                 progress=progress, description=f"reference {style}")
        out[style] = {
            "novel_ap50": round(_mean_ap50(metrics, names), 4),
            "map50": metrics["map50"],
            "per_class_ap50": {n: round(v["ap50"], 4) for n, v in metrics["per_class"].items() if v["ap50"] == v["ap50"]},
        }
    return out


def run_emoji_fewshot(
    model: nn.Module,
    data: EmojiFewShotData,
    *,
    reference: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    batch_size: int = 8,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`~fewsight.fewshot.run_fewshot` on both test sets of ``data``, and the reference's novel AP50.

    ``model``: a DLDENet over the base classes (``data.base_names``, any order); ``kwargs``: the other
    arguments of :func:`run_fewshot` (``shots``, ``seeds``, ``modes``, ``finetune_steps``, ...). The
    support sets are the same for both styles (sampled with the same seeds from ``data.support``).

    Returns ``{"styles": {style: {"role", "base_before", "summary", "runs"}}, "reference": ...}`` with
    same style first; a ``summary`` row gains ``novel_ap50_vs_reference`` (its novel AP50 over the
    reference's on that style's test set) when ``reference`` is given. Per-class AP50 of classes
    without ground truth in the test set (no AP) are left out of ``runs``.
    """
    base = [str(c) for c in getattr(model, "classes", [])]
    if sorted(base) != sorted(data.base_names):
        raise InvalidArgumentError(
            f"model: expected a detector over the {len(data.base_names)} emoji base classes "
            f"(configs/emoji_base.yaml), got {len(base)} classes {base[:5]}{'...' if len(base) > 5 else ''}"
        )
    say = log or (lambda _msg: None)
    ref = evaluate_reference(reference, data, batch_size=batch_size, progress=progress) if reference is not None else None
    if ref is not None:
        say("reference: novel AP50 " + ", ".join(f"{s} {r['novel_ap50']:.4f}" for s, r in ref.items()))
    styles: dict[str, Any] = {}
    for style, test in data.tests.items():
        role = "same-style" if style == data.support_style else "cross-style"
        result = run_fewshot(model, support_dataset=data.support, test_dataset=test, novel_classes=data.novel,
                             batch_size=batch_size, progress=progress,
                             log=lambda msg, s=style: say(f"[{s}] {msg}"), **kwargs)
        summary = result.summary()
        for row in summary:
            if ref is not None:
                r = ref[style]["novel_ap50"]
                row["novel_ap50_vs_reference"] = round(row["novel_ap50"] / r, 4) if r > 0 else float("nan")
        runs = [{**run, "per_class_ap50": {n: v for n, v in run["per_class_ap50"].items() if v == v}}
                for run in result.runs]
        styles[style] = {"role": role, "base_before": result.base_before, "summary": summary, "runs": runs}
    return {"styles": styles, "reference": ref}
