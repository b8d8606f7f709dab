"""DLDENet: the class-direction store at extremes,
tracked-means semantics (EMA, manual, out of place, DDP), losses, overfitting, enrollment, state."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from fewsight.errors import CheckpointError, InvalidArgumentError, LabelError
from fewsight.losses.functional import dispersion_loss, focal_loss_from_log_probs
from fewsight.models import DLDENet
from fewsight.models.assignment import prepare_targets
from fewsight.models.directions import DirectionalClassifier
from tests._helpers import one_thread  # noqa: F401  (autouse: one torch thread for tiny models)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(num_classes: int = 2, **kw) -> DLDENet:
    kw.setdefault("levels", (3, 4, 5))
    kw.setdefault("fpn_channels", 32)
    kw.setdefault("head_convs", 1)
    kw.setdefault("embedding_dim", 16)
    return DLDENet(num_classes, **kw)


def empty_targets(n: int = 1):
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(n)]


# --- probabilities ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [-1e4, -50.0, 0.0, 50.0, 1e4])
@pytest.mark.parametrize("bias", [-1e3, -0.5, 3.0])
def test_probabilities_in_unit_interval_and_finite_at_extremes(raw, bias):
    torch.manual_seed(0)
    clf = DirectionalClassifier(3, 4)
    with torch.no_grad():
        clf.raw_scale.fill_(raw)  # pushes w towards 0 (softplus underflow) or to huge values
        clf.bias.fill_(bias)
    e = torch.cat((clf.means[:2], -clf.means[2:], torch.randn(3, 4))).requires_grad_()  # cos = 1, -1, random
    log_p, log_1mp = clf(e)
    p = log_p.exp()
    assert ((p >= 0) & (p <= 1)).all() and torch.isfinite(log_p).all() and torch.isfinite(log_1mp).all()
    labels = torch.tensor([0, 1, 2, -1, -2, 0])
    loss = focal_loss_from_log_probs(log_p, log_1mp, labels)
    loss.backward()
    assert torch.isfinite(loss)
    for g in (e.grad, clf.raw_scale.grad, clf.bias.grad):
        assert torch.isfinite(g).all()


def test_half_precision_embeddings_give_float32_finite_results():
    clf = DirectionalClassifier(3, 8)
    e = torch.randn(5, 8).to(torch.bfloat16)
    log_p, log_1mp = clf(e)
    assert log_p.dtype == torch.float32 and torch.isfinite(log_p).all() and torch.isfinite(log_1mp).all()


def _unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=-1)


def test_batch_ema_on_a_hand_made_case_and_unseen_class_keeps_its_mean():
    clf = DirectionalClassifier(3, 3)
    means = torch.stack((_unit(1, 0, 0), _unit(0, 1, 0), _unit(0, 0, 1)))
    clf.means = means.clone()
    before = clf.means
    e = torch.stack((_unit(0, 1, 0), _unit(0, 0, 1), _unit(1, 1, 0), _unit(5, 5, 5)))
    labels = torch.tensor([0, 0, 2, -1])
    clf.update_means_ema(e, labels, lr=0.1)
    m0 = F.normalize(0.9 * means[0] + 0.1 * _unit(0, 1, 1), dim=0)  # class 0: normalised sum of two
    m2 = F.normalize(0.9 * means[2] + 0.1 * _unit(1, 1, 0), dim=0)
    torch.testing.assert_close(clf.means[0], m0)
    torch.testing.assert_close(clf.means[1], means[1])  # unseen: unchanged
    torch.testing.assert_close(clf.means[2], m2)
    # Out of place: the previous tensor (possibly saved by autograd) is untouched.
    torch.testing.assert_close(before, means)
    assert before is not clf.means


def test_cancelling_embeddings_keep_the_mean_never_nan():
    clf = DirectionalClassifier(2, 2)
    old = clf.means.clone()
    clf.update_means_ema(torch.stack((_unit(1, 0), _unit(-1, 0))), torch.tensor([1, 1]))
    torch.testing.assert_close(clf.means, old)
    clf.update_means_ema(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    torch.testing.assert_close(clf.means, old)


def test_manual_mode_accumulates_and_update_means():
    clf = DirectionalClassifier(3, 2)
    old = clf.means.clone()
    clf.accumulate(torch.stack((_unit(1, 0), _unit(1, 1))), torch.tensor([0, 2]))
    clf.accumulate(torch.stack((_unit(0, 1),)), torch.tensor([0]))
    torch.testing.assert_close(clf.means, old)  # nothing moves before update_means
    clf.update_means()
    torch.testing.assert_close(clf.means[0], _unit(1, 1))
    torch.testing.assert_close(clf.means[1], old[1])
    torch.testing.assert_close(clf.means[2], _unit(1, 1))
    assert clf.mean_sums.abs().sum() == 0 and clf.mean_counts.sum() == 0
    clf.update_means()  # nothing accumulated: unchanged, no NaN
    assert torch.isfinite(clf.means).all()


def _sample(seed: int = 0):
    torch.manual_seed(seed)
    images = torch.rand(2, 3, 80, 80)
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    return images, targets


def test_training_step_updates_only_seen_means_with_the_loss_matching():
    images, targets = _sample()
    model = tiny(3).train()
    old = model.classifier.means.clone()
    out = model.forward_head(images)
    padded = prepare_targets(targets, 2)
    losses = model.compute_loss(out.outputs, out.anchors, padded)
    assert set(losses) == {"classification", "box_regression", "ccs"}
    sum(losses.values()).backward()  # the update after the graph was built does not break backward
    asg = model.assign(out.anchors, padded)
    pos = out.outputs["embeddings"].detach()[asg.labels == 1]
    expected = F.normalize(0.9 * old[1] + 0.1 * F.normalize(pos.sum(0), dim=0), dim=0)
    torch.testing.assert_close(model.classifier.means[1], expected)
    torch.testing.assert_close(model.classifier.means[[0, 2]], old[[0, 2]])
    model.eval()
    frozen = model.classifier.means.clone()
    model.compute_loss(out.outputs, out.anchors, padded)  # eval: no update
    torch.testing.assert_close(model.classifier.means, frozen)


def test_manual_and_none_modes_in_the_model():
    images, targets = _sample()
    model = tiny(means_update="manual").train()
    old = model.classifier.means.clone()
    model(images, targets)
    torch.testing.assert_close(model.classifier.means, old)
    assert model.classifier.mean_counts[1] > 0
    model.update_means()
    assert not torch.allclose(model.classifier.means[1], old[1])
    torch.testing.assert_close(model.classifier.means[0], old[0])
    model = tiny(means_update="none").train()
    old = model.classifier.means.clone()
    model(images, targets)
    torch.testing.assert_close(model.classifier.means, old)


def test_empty_targets_finite_losses_zero_box_and_ccs():
    torch.manual_seed(0)
    model = tiny().train()
    old = model.classifier.means.clone()
    losses = model(torch.rand(2, 3, 64, 64), empty_targets(2))
    assert losses["box_regression"].item() == 0.0 and losses["ccs"].item() == 0.0
    assert torch.isfinite(losses["classification"]) and losses["classification"] > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(model.classifier.means, old)


def test_learned_directions_and_dispersion():
    images, targets = _sample()
    model = tiny(3, directions="learned", loss_weights={"dispersion": 0.5}).train()
    losses = model(images, targets)
    assert set(losses) == {"classification", "box_regression", "ccs", "dispersion"}
    torch.testing.assert_close(losses["dispersion"], 0.5 * dispersion_loss(model.classifier.weight))
    sum(losses.values()).backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    assert not hasattr(model.classifier, "means")
    with pytest.raises(InvalidArgumentError):
        tiny(loss_weights={"dispersion": 0.5})  # tracked means do not move by gradient


def test_argument_validation():
    with pytest.raises(InvalidArgumentError):
        tiny(directions="fixed")
    with pytest.raises(InvalidArgumentError):
        tiny(means_update="epoch")
    with pytest.raises(InvalidArgumentError):
        tiny(means_lr=0.0)
    with pytest.raises(LabelError):
        tiny().train()(*_sample()[:1], [{"boxes": torch.tensor([[1.0, 1.0, 30.0, 30.0]]), "labels": torch.tensor([2])}] * 2)


# --- training, enrollment, state (one small trained model shared by these tests) -----------------------


def _canvas(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 96, 96, generator=g) * 0.2


def _scene(seed=0):
    img = _canvas(seed)
    img[0, :, 40:80, 8:48] = torch.tensor([0.9, 0.8, 0.1])[:, None, None]  # square
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    disk = (xx - 70) ** 2 + (yy - 28) ** 2 <= 18 * 18
    img[0, :, disk] = torch.tensor([0.1, 0.3, 0.9])[:, None]
    boxes = torch.tensor([[8.0, 40.0, 48.0, 80.0], [52.0, 10.0, 89.0, 47.0]])
    return img, [{"boxes": boxes, "labels": torch.tensor([0, 1])}]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    img, targets = _scene()
    model = tiny(2, head_convs=2, class_names=["square", "disk"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    history = []
    for _ in range(30):
        losses = model(img, targets)
        loss = sum(losses.values())
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), history


def test_overfits_one_image(trained):
    model, history = trained
    assert history[-1] < 0.3 * history[0]
    img, targets = _scene()
    with torch.no_grad():
        det = model(img)[0]
    for label, box in zip(targets[0]["labels"], targets[0]["boxes"]):
        mine = det["labels"] == label
        assert mine.any()
        assert box_iou(det["boxes"][mine][:1], box[None]).item() > 0.5


def test_enroll_adds_a_class_that_is_detected(trained):
    model = copy.deepcopy(trained[0])
    img, targets = _scene()
    disk = targets[0]["boxes"][1:]
    new = model.enroll(img, [{"boxes": disk, "labels": torch.tensor([0])}], ["disk, enrolled"])
    assert new == [2] and model.classes == ["square", "disk", "disk, enrolled"] and model.num_classes == 3
    torch.testing.assert_close(F.softplus(model.classifier.raw_scale[2]), torch.tensor(7.0))
    torch.testing.assert_close(model.classifier.bias[2], torch.tensor(-0.5))
    with torch.no_grad():
        out = model.forward_head(img)
        p = model.scores_from_outputs(out.outputs)[0]
        asg = model.assign(out.anchors, prepare_targets(targets, 1))
        dets = model.postprocess(out)[0]
    # The new class scores high on the enrolled object and low on the other one.
    assert p[asg.labels[0] == 1, 2].mean() > 0.5
    assert p[asg.labels[0] == 0, 2].mean() < 0.1
    on_disk = box_iou(dets["boxes"], disk)[:, 0] > 0.5
    assert (dets["labels"][on_disk] == 2).any()
    assert dets["labels"][on_disk][0] in (1, 2)  # the best box on the disk is a disk class
    with pytest.raises(InvalidArgumentError):
        model.enroll(img, [{"boxes": disk, "labels": torch.tensor([0])}], ["square"])  # name exists
    assert model.training is False


def test_enroll_direction_is_the_mean_of_positive_anchor_embeddings():
    torch.manual_seed(0)
    model = tiny(0).train()  # no class at all: every class is enrolled
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 44.0], [30.0, 20.0, 70.0, 60.0]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([0])},
    ]
    assert model.enroll(images, targets, ["a", "b"], batch_size=1) == [0, 1]
    assert model.training and model.classes == ["a", "b"]
    model.eval()
    expected = []
    with torch.no_grad():
        sums = torch.zeros(2, 16)
        for im, t in zip(images, targets):
            out = model.forward_head([im])
            asg = model.assign(out.anchors, prepare_targets([t], 1))
            for c in range(2):
                sums[c] += out.outputs["embeddings"][0][asg.labels[0] == c].sum(0)
        expected = F.normalize(sums, dim=1)
    torch.testing.assert_close(model.classifier.means, expected)
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2
    with pytest.raises(InvalidArgumentError):  # a name without any box
        model.enroll(images[:1], targets[:1], ["c", "d", "e"])


def test_state_dict_round_trip_with_enrolled_classes(trained):
    model = copy.deepcopy(trained[0])
    img, targets = _scene()
    model.enroll(img, [{"boxes": targets[0]["boxes"][1:], "labels": torch.tensor([0])}], ["novel"])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = tiny(2, head_convs=2).eval()  # fewer classes than the checkpoint: resized on load
    fresh.load_state_dict(state)
    assert fresh.classes == ["square", "disk", "novel"] and fresh.num_classes == 3
    torch.testing.assert_close(fresh.classifier.means, model.classifier.means)
    with torch.no_grad():
        a, b = model(img)[0], fresh(img)[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    bigger = tiny(5, head_convs=2)
    bigger.load_state_dict(state)  # more classes than the checkpoint: shrunk
    assert bigger.num_classes == 3
    bad = dict(state)
    bad["_extra_state"] = {"classes": ["only-one"]}
    with pytest.raises(CheckpointError):
        tiny(2, head_convs=2).load_state_dict(bad)


# --- distributed ------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial means on both ranks
        clf = DirectionalClassifier(2, 2)
        mine = torch.stack((_unit(1, 0),)) if rank == 0 else torch.stack((_unit(0, 1),))
        clf.update_means_ema(mine, torch.tensor([0]), lr=0.5)
        torch.save(clf.means, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_means_are_all_reduced_under_distributed(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    out = str(tmp_path / "means")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    a, b = torch.load(out + ".0"), torch.load(out + ".1")
    torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    init = DirectionalClassifier(2, 2).means
    expected = F.normalize(0.5 * init[0] + 0.5 * _unit(1, 1), dim=0)  # both ranks' sums together
    torch.testing.assert_close(a[0], expected)
    torch.testing.assert_close(a[1], init[1])


@CUDA
def test_cuda_train_eval_enroll_bf16():
    torch.manual_seed(0)
    model = tiny().cuda().train()
    images, targets = _sample()
    images = images.cuda()
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        dets = model(images)
    assert dets[0]["scores"].dtype == torch.float32
    model.enroll(images[:1], targets[:1], ["new"])
    assert model.classifier.means.device.type == "cuda" and model.num_classes == 3
