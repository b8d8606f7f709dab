"""The few-shot protocol (SPEC §5): mean ± 95% interval, k-shot support sampling, enrollment from a
dataset, head fine-tuning, run_fewshot on tiny digit canvases, and its plot."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewsight.data import DigitsDataset
from fewsight.errors import InvalidArgumentError
from fewsight.eval import evaluate_model, plot_fewshot
from fewsight.fewshot import (
    FewShotResult,
    SupportSet,
    enroll_from_dataset,
    enroll_support,
    finetune,
    mean_interval,
    run_fewshot,
    sample_support,
)
from fewsight.models import DLDENet
from tests._helpers import one_thread  # noqa: F401  (autouse)

D = 8


def tiny(num_classes: int = 2, **kw) -> DLDENet:
    torch.manual_seed(0)
    kw = {"backbone": "resnet18", "levels": (3, 4, 5), "fpn_channels": 16, "embedding_dim": D, "head_convs": 1, **kw}
    if num_classes and "class_names" not in kw:
        kw["class_names"] = [str(i) for i in range(num_classes)]
    return DLDENet(num_classes, **kw)


def digits(split: str, n: int, classes=(0, 1, 2), seed: int = 0) -> DigitsDataset:
    return DigitsDataset(split, n, image_size=64, digit_size=(16, 32), max_digits=2, classes=classes, seed=seed,
                         clutter=False)


@pytest.fixture(scope="module")
def support_data():
    return digits("train", 12)


def _instances(dataset) -> dict[int, int]:
    counts: dict[int, int] = {}
    for i in range(len(dataset)):
        for lab in dataset.get_target(i)["labels"].tolist():
            counts[lab] = counts.get(lab, 0) + 1
    return counts


class ListDataset:
    """A plain dataset (no ``get_target``): items ``(image, target)``, ``classes``."""

    def __init__(self, items, classes):
        self.items, self.classes = items, classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# --- mean_interval --------------------------------------------------------------------------------------


def test_mean_interval_by_hand():
    mean, half = mean_interval([0.70, 0.74, 0.72])
    sd = math.sqrt(((0.70 - 0.72) ** 2 + (0.74 - 0.72) ** 2 + 0.0) / 2)  # 0.02
    assert mean == 0.72
    assert half == round(4.303 * sd / math.sqrt(3), 4) == 0.0497
    assert mean_interval([0.5]) == (0.5, 0.0)
    assert mean_interval((1, 1, 1, 1)) == (1.0, 0.0)
    assert mean_interval([0.123456, 0.123456]) == (0.1235, 0.0)  # rounded to 4 decimals
    with pytest.raises(InvalidArgumentError, match="values"):
        mean_interval([])


@pytest.mark.parametrize("n", [2, 3, 5, 10, 31])
def test_mean_interval_uses_the_student_t_quantile(n):
    stats = pytest.importorskip("scipy.stats")
    values = [0.1 * math.sin(i) + 0.5 for i in range(n)]
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    want = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    got_mean, got_half = mean_interval(values)
    assert got_mean == pytest.approx(mean, abs=5e-5)
    assert got_half == pytest.approx(want, rel=1e-3, abs=5e-5)


def test_mean_interval_beyond_the_table():
    stats = pytest.importorskip("scipy.stats")
    values = [0.1 * math.sin(i) + 0.5 for i in range(41)]
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    want = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert mean_interval(values)[1] == pytest.approx(want, rel=5e-3)


# --- sample_support -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_sample_support_takes_exactly_k_instances_per_class(support_data, k):
    classes = [2, 0]
    s = sample_support(support_data, classes, k, seed=3)
    assert isinstance(s, SupportSet) and s.k == k and s.classes == classes
    assert len(s.indices) == len(s.targets) == len(set(s.indices))
    labels = torch.cat([t["labels"] for t in s.targets])
    assert [(labels == j).sum().item() for j in range(len(classes))] == [k, k]
    assert ((labels >= -1) & (labels < len(classes))).all()
    for i, t in zip(s.indices, s.targets):
        orig = support_data.get_target(i)
        torch.testing.assert_close(t["boxes"], orig["boxes"])  # every box kept, in order
        taken = t["labels"] >= 0
        assert taken.any()  # an image is used only for an instance it contributes
        # taken boxes: relabelled to their position in `classes`; the others are unknown (-1)
        assert [classes[j] for j in t["labels"][taken].tolist()] == orig["labels"][taken].tolist()
    imgs = s.images(support_data)
    assert len(imgs) == len(s.indices)
    torch.testing.assert_close(imgs[0], support_data[s.indices[0]][0])


def test_sample_support_other_classes_and_extra_instances_are_unknown(support_data):
    s = sample_support(support_data, [1], 1, seed=0)
    for i, t in zip(s.indices, s.targets):
        orig = support_data.get_target(i)["labels"]
        assert (t["labels"][orig != 1] == -1).all()
    assert (torch.cat([t["labels"] for t in s.targets]) == 0).sum() == 1


def test_sample_support_is_deterministic_by_seed(support_data):
    a = sample_support(support_data, [0, 1, 2], 1, seed=5)
    b = sample_support(support_data, [0, 1, 2], 1, seed=5)
    assert a.indices == b.indices
    for x, y in zip(a.targets, b.targets):
        assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["boxes"], y["boxes"])
    picks = {tuple(sample_support(support_data, [0, 1, 2], 1, seed=s).indices) for s in range(6)}
    assert len(picks) > 1  # different seeds, different support sets


def test_sample_support_without_get_target():
    box = torch.tensor([[2.0, 2.0, 10.0, 10.0], [12.0, 12.0, 20.0, 20.0]])
    items = [(torch.rand(3, 24, 24), {"boxes": box, "labels": torch.tensor(lab)}) for lab in ([0, 1], [1, 1], [0, 0])]
    data = ListDataset(items, ["a", "b"])
    s = sample_support(data, [1], 3, seed=0)
    assert sorted(s.indices) == [0, 1]
    assert (torch.cat([t["labels"] for t in s.targets]) == 0).sum() == 3


def test_sample_support_errors(support_data):
    counts = _instances(support_data)
    with pytest.raises(InvalidArgumentError, match=r"k: expected at least") as info:
        sample_support(support_data, [0, 2], counts[2] + 1, seed=0)
    assert f"found only {{0: {counts[0]}, 2: {counts[2]}}}" in str(info.value)  # what the dataset has
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(InvalidArgumentError, match="k"):
            sample_support(support_data, [0], bad, seed=0)
    # exactly as many instances as the dataset holds: fine
    s = sample_support(support_data, [2], counts[2], seed=0)
    assert (torch.cat([t["labels"] for t in s.targets]) == 0).sum() == counts[2]


# --- enroll_from_dataset / enroll_support ----------------------------------------------------------------


def test_enroll_from_dataset_defaults_to_the_unknown_classes(support_data):
    model = tiny(2).eval()
    assert enroll_from_dataset(model, support_data) == [2]
    assert model.classes == ["0", "1", "2"] and model.num_classes == 3
    # every box of class 2, nothing else: the same as enrolling those targets by hand
    ref = tiny(2).eval()
    idx, targets = [], []
    for i in range(len(support_data)):
        t = support_data.get_target(i)
        if (t["labels"] == 2).any():
            idx.append(i)
            targets.append({"boxes": t["boxes"], "labels": torch.where(t["labels"] == 2, 0, -1)})
    ref.enroll([support_data[i][0] for i in idx], targets, ["2"])
    torch.testing.assert_close(model.classifier.means, ref.classifier.means, rtol=1e-5, atol=1e-6)
    assert model.training is False


def test_enroll_from_dataset_with_k_uses_sample_support(support_data):
    model = tiny(1).train()
    assert enroll_from_dataset(model, support_data, ["2", "1"], k=1, seed=4) == [1, 2]
    assert model.classes == ["0", "2", "1"] and model.training
    s = sample_support(support_data, [2, 1], 1, seed=4)
    ref = tiny(1)
    assert enroll_support(ref, s.images(support_data), s, ["2", "1"]) == [1, 2]
    torch.testing.assert_close(model.classifier.means, ref.classifier.means, rtol=1e-5, atol=1e-6)
    # other seeds, other support sets
    other = tiny(1)
    enroll_from_dataset(other, support_data, ["2", "1"], k=1, seed=5)
    assert not torch.allclose(other.classifier.means[1:], model.classifier.means[1:])


def test_enroll_from_dataset_errors(support_data):
    model = tiny(2)
    with pytest.raises(InvalidArgumentError, match=r"names: .*support dataset.*\['7'\]"):
        enroll_from_dataset(model, support_data, ["2", "7"])
    with pytest.raises(InvalidArgumentError, match="already knows every dataset class"):
        enroll_from_dataset(tiny(3), support_data)
    with pytest.raises(InvalidArgumentError, match="names"):
        enroll_from_dataset(model, support_data, ["1"])  # the model knows it
    with pytest.raises(InvalidArgumentError, match="k: expected at least"):
        enroll_from_dataset(model, support_data, ["2"], k=1000)
    assert model.classes == ["0", "1"] and model.num_classes == 2  # nothing was added


def test_enroll_from_dataset_class_without_boxes_is_a_clear_error():
    box = torch.tensor([[2.0, 2.0, 40.0, 40.0]])
    items = [(torch.rand(3, 64, 64), {"boxes": box, "labels": torch.tensor([lab])}) for lab in (0, 1)]
    data = ListDataset(items, ["0", "1", "2"])  # class "2" is listed but never annotated (a COCO category can be)
    with pytest.raises(InvalidArgumentError, match="'2'"):
        enroll_from_dataset(tiny(2), data)


# --- finetune -------------------------------------------------------------------------------------------


def _finetune_setup(support_data, **kw):
    s = sample_support(support_data, [0, 1, 2], 2, seed=0)
    images = s.images(support_data)
    model = tiny(0, **kw)
    enroll_support(model, images, s, ["0", "1", "2"])
    return model.eval(), images, s.targets


def _bn_and_backbone_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}


def test_finetune_head_lowers_the_loss_and_freezes_the_backbone(support_data):
    model, images, targets = _finetune_setup(support_data)
    frozen = _bn_and_backbone_state(model)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    bn = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    hook = bn.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    head_modes = []
    hook2 = model.head.register_forward_pre_hook(lambda m, _: head_modes.append(m.training))
    try:
        losses = finetune(model, images, targets, steps=20, lr=3e-4, batch_size=8, trainable="head")
    finally:
        hook.remove()
        hook2.remove()
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0] and min(losses) < 0.2 * losses[0]
    assert seen and not any(seen)  # BatchNorm in eval mode throughout
    assert head_modes and all(head_modes)  # the head trains
    after = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(v, after[k]), k  # backbone + FPN weights and BN statistics unchanged
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in head.items())
    assert model.training is False  # mode restored


def test_finetune_keeps_lowering_the_loss_with_fixed_directions(support_data):
    model, images, targets = _finetune_setup(support_data, means_update="none")
    losses = finetune(model, images, targets, steps=20, lr=3e-4)
    assert sum(losses[-5:]) < sum(losses[5:10]) < sum(losses[:5])


def test_finetune_head_computes_no_backbone_gradient(support_data):
    model, images, targets = _finetune_setup(support_data)
    finetune(model, images, targets, steps=2, lr=1e-4)
    assert all(p.grad is None for p in model.backbone.parameters())


def test_finetune_all_trains_the_backbone_but_not_bn_statistics(support_data):
    model, images, targets = _finetune_setup(support_data)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    losses = finetune(model, images, targets, steps=2, lr=1e-3, trainable="all", batch_size=2, seed=1)
    assert len(losses) == 2 and model.training
    after = model.backbone.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    weights = [k for k in before if k.endswith("weight") and not k.endswith(("running_mean", "running_var"))]
    assert any(not torch.equal(before[k], after[k]) for k in weights)


def test_finetune_edge_cases_and_errors(support_data):
    model, images, targets = _finetune_setup(support_data)
    state = copy.deepcopy(model.state_dict())
    assert finetune(model, images, targets, steps=0) == []
    assert finetune(model, [], [], steps=5) == []
    for k, v in state.items():
        assert torch.equal(v, model.state_dict()[k]) if isinstance(v, torch.Tensor) else v == model.state_dict()[k]
    with pytest.raises(InvalidArgumentError, match="trainable"):
        finetune(model, images, targets, trainable="backbone")
    with pytest.raises(InvalidArgumentError, match="steps"):
        finetune(model, images, targets, steps=-1)


def test_finetune_is_reproducible_by_seed(support_data):
    runs = []
    for _ in range(2):
        model, images, targets = _finetune_setup(support_data)
        runs.append(finetune(model, images, targets, steps=3, lr=1e-4, batch_size=2, seed=7))
    assert runs[0] == runs[1]


# --- FewShotResult / run_fewshot / plot_fewshot ------------------------------------------------------------


def _row(mode, k, seed, novel, base):
    return {"mode": mode, "k": k, "seed": seed, "novel_ap50": novel, "base_ap50": base}


def test_summary_rows_are_mean_and_interval_per_mode_and_k():
    runs = [_row("finetune", 1, 0, 0.4, 0.8), _row("enroll", 5, 0, 0.5, 0.9), _row("enroll", 1, 0, 0.2, 0.9),
            _row("enroll", 1, 1, 0.3, 0.7), _row("finetune", 1, 1, 0.6, 0.6), _row("enroll", 1, 2, 0.4, 0.8)]
    result = FewShotResult(runs=runs, base_before={"ap50": 0.95, "map50": 0.9})
    rows = result.summary()
    assert [(r["mode"], r["k"], r["seeds"]) for r in rows] == [("enroll", 1, 3), ("enroll", 5, 1), ("finetune", 1, 2)]
    novel, base = mean_interval([0.2, 0.3, 0.4]), mean_interval([0.9, 0.7, 0.8])
    assert (rows[0]["novel_ap50"], rows[0]["novel_ap50_ci95"]) == novel
    assert (rows[0]["base_ap50"], rows[0]["base_ap50_ci95"]) == base
    assert rows[0]["base_ap50_drop"] == pytest.approx(0.95 - base[0])
    assert rows[1]["novel_ap50_ci95"] == 0.0
    assert FewShotResult(runs=runs).summary()[0]["base_ap50_drop"] is None
    d = result.to_dict()
    assert set(d) == {"base_before", "summary", "runs"} and d["summary"] == rows and d["runs"] == runs


@pytest.fixture(scope="module")
def fewshot_run(support_data):
    model = tiny(2).eval()
    test = digits("test", 4, seed=3)  # every class annotated
    state = copy.deepcopy(model.state_dict())
    messages: list[str] = []
    result = run_fewshot(model, support_dataset=support_data, test_dataset=test, novel_classes=[2], shots=[1],
                         seeds=[0, 1], modes=["enroll", "finetune"], finetune_steps=2, finetune_lr=1e-4,
                         batch_size=4, progress=False, log=messages.append)
    return model, state, test, result, messages


def test_run_fewshot_rows_and_summary(fewshot_run):
    _, _, _, result, messages = fewshot_run
    assert set(result.base_before) == {"ap50", "map50"} and 0.0 <= result.base_before["ap50"] <= 1.0
    assert [(r["mode"], r["k"], r["seed"], r["finetune_steps"]) for r in result.runs] == [
        ("enroll", 1, 0, 0), ("finetune", 1, 0, 2), ("enroll", 1, 1, 0), ("finetune", 1, 1, 2)]
    for r in result.runs:
        assert list(r["per_class_ap50"]) == ["0", "1", "2"]  # base classes first, then novel
        assert r["novel_ap50"] == pytest.approx(r["per_class_ap50"]["2"], abs=1e-4)
        base = [v for n, v in r["per_class_ap50"].items() if n != "2" and v == v]
        assert r["base_ap50"] == pytest.approx(sum(base) / len(base), abs=1e-4)
        assert all(0.0 <= v <= 1.0 for v in (r["novel_ap50"], r["base_ap50"]))
    rows = result.summary()
    assert [(r["mode"], r["k"], r["seeds"]) for r in rows] == [("enroll", 1, 2), ("finetune", 1, 2)]
    for row in rows:
        runs = [r for r in result.runs if r["mode"] == row["mode"]]
        assert (row["novel_ap50"], row["novel_ap50_ci95"]) == mean_interval([r["novel_ap50"] for r in runs])
        assert row["base_ap50_drop"] == round(result.base_before["ap50"] - row["base_ap50"], 4)
    assert len(messages) == 5 and messages[0].startswith("base model")


def test_run_fewshot_leaves_the_base_model_unchanged(fewshot_run):
    model, state, _, _, _ = fewshot_run
    assert model.classes == ["0", "1"] and model.num_classes == 2 and model.training is False
    after = model.state_dict()
    assert set(after) == set(state)
    for k, v in state.items():
        assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k], k


def test_run_fewshot_enroll_row_equals_the_manual_protocol(fewshot_run, support_data):
    model, _, test, result, _ = fewshot_run
    run = copy.deepcopy(model)
    s = sample_support(support_data, [2], 1, seed=1)
    enroll_support(run, s.images(support_data), s, ["2"])
    metrics = evaluate_model(run, test, 4, class_names=["0", "1", "2"], progress=False)
    row = next(r for r in result.runs if r["mode"] == "enroll" and r["seed"] == 1)
    assert row["novel_ap50"] == round(metrics["per_class"]["2"]["ap50"], 4)


def test_run_fewshot_errors(support_data):
    model = tiny(2)
    test = digits("test", 2, seed=1)
    kw = {"support_dataset": support_data, "test_dataset": test, "shots": [1], "seeds": [0], "progress": False}
    with pytest.raises(InvalidArgumentError, match="modes"):
        run_fewshot(model, novel_classes=[2], modes=["retrain"], **kw)
    with pytest.raises(InvalidArgumentError, match="support_dataset"):
        run_fewshot(model, support_dataset=digits("train", 2, classes=(0, 1, 3)), test_dataset=test,
                    novel_classes=[2], shots=[1], seeds=[0], progress=False)
    with pytest.raises(InvalidArgumentError, match="novel_classes"):
        run_fewshot(model, novel_classes=[1], **kw)  # the model already knows "1"
    with pytest.raises(InvalidArgumentError, match="novel_classes"):
        run_fewshot(tiny(2, class_names=["cat", "dog"]), novel_classes=[2], **kw)


@pytest.mark.parametrize("novel", [[], [5]])
def test_run_fewshot_rejects_bad_novel_classes_up_front(support_data, novel):
    test = digits("test", 2, seed=1, classes=(0, 1, 2))
    model = tiny(3)
    with pytest.raises(InvalidArgumentError, match="novel_classes"):
        run_fewshot(model, support_dataset=digits("train", 2), test_dataset=test, novel_classes=novel,
                    shots=[1], seeds=[0], progress=False)


@pytest.mark.parametrize("grid", [{"shots": [0]}, {"shots": [1], "modes": ["finetune"], "finetune_steps": -1}])
def test_run_fewshot_validates_the_grid_before_any_work(support_data, grid):
    model = tiny(2)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(InvalidArgumentError):
        run_fewshot(model, support_dataset=support_data, test_dataset=digits("test", 2, seed=3), novel_classes=[2],
                    seeds=[0], progress=False, **grid)
    assert not calls


def test_plot_fewshot_writes_a_png(tmp_path, fewshot_run):
    from matplotlib.figure import Figure

    rows = fewshot_run[3].summary() + [
        {"mode": "enroll", "k": 5, "novel_ap50": 0.5, "novel_ap50_ci95": 0.1, "base_ap50": 0.7, "base_ap50_ci95": 0.05}
    ]
    fig = plot_fewshot(rows, tmp_path / "sub" / "fewshot.png", base_before=0.8, title="tiny")
    assert isinstance(fig, Figure)
    data = (tmp_path / "sub" / "fewshot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"novel, enroll", "base, enroll", "novel, finetune", "base, finetune", "base, before enrollment"} <= set(labels)
    assert plot_fewshot(rows[:1]) is not None  # no path, no base line
