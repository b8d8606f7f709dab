"""EnrollSettings: one default for the API and the command line, validated, passed to each model as it takes it."""

from __future__ import annotations

import math

import pytest
import torch

from fewsight.cli import build_parser
from fewsight.cli.common import enroll_settings
from fewsight.errors import InvalidArgumentError
from fewsight.fewshot import CropEmbedder, CropRescorer, EnrollSettings, enroll, enroll_from_dataset
from fewsight.models import DLDENet


def tiny_dldenet() -> DLDENet:
    torch.manual_seed(0)
    return DLDENet(2, backbone="resnet18", levels=(3, 4, 5), fpn_channels=16, embedding_dim=8, head_convs=1).eval()


SUPPORT = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([0])}]


@pytest.mark.parametrize("command", [["enroll", "--checkpoint", "m.pt", "--support", "digits", "--out", "o.pt"],
                                     ["bench", "fewshot", "--checkpoint", "m.pt"]])
def test_command_line_defaults_are_the_api_defaults(command):
    args = build_parser().parse_args(command)
    assert enroll_settings(args) == EnrollSettings()
    flipped = build_parser().parse_args([*command, "--no-calibrate", "--rivalry", "0"])
    assert enroll_settings(flipped) == EnrollSettings(calibrate=False, rivalry=0.0)


@pytest.mark.parametrize("kwargs", [{"rivalry": -1.0}, {"rivalry": math.nan}, {"rivalry": math.inf},
                                    {"calibrate": 1}, {"batch_size": 0}, {"rivalry": True}])
def test_bad_settings_raise_naming_the_field(kwargs):
    with pytest.raises(InvalidArgumentError, match=next(iter(kwargs))):
        EnrollSettings(**kwargs)


def test_bad_rivalry_flag_names_the_flag():
    args = build_parser().parse_args(["bench", "fewshot", "--checkpoint", "m.pt", "--rivalry", "nan"])
    with pytest.raises(InvalidArgumentError, match="^--rivalry: expected a finite number"):
        enroll_settings(args)


def test_options_follow_each_models_enroll():
    settings = EnrollSettings(calibrate=False, rivalry=3.0, batch_size=2)
    det = tiny_dldenet()
    assert settings.options_for(det) == {"batch_size": 2, "calibrate": False, "rivalry": 3.0}
    wrapped = CropRescorer(det, CropEmbedder(dim=8, grid=1, crop_size=16, pretrained=False))
    assert settings.options_for(wrapped) == {"calibrate": False}


def test_enroll_applies_the_settings_to_a_dldenet():
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
    plain, gated = tiny_dldenet(), tiny_dldenet()
    assert enroll(plain, images, SUPPORT, ["new"], EnrollSettings(calibrate=False, rivalry=0.0)) == [2]
    assert enroll(gated, images, SUPPORT, ["new"], EnrollSettings(calibrate=False, rivalry=4.0)) == [2]
    expected = tiny_dldenet()
    expected.enroll(images, SUPPORT, ["new"], calibrate=False, rivalry=4.0)
    torch.testing.assert_close(gated.state_dict()["classifier.rivalry"], expected.state_dict()["classifier.rivalry"])
    assert not torch.equal(plain.state_dict()["classifier.rivalry"], gated.state_dict()["classifier.rivalry"])


def test_uncalibrated_crop_scores_are_the_sigmoid_of_the_cosine():
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))]
    model = CropRescorer(tiny_dldenet(), CropEmbedder(dim=8, grid=1, crop_size=16, pretrained=False)).eval()
    enroll(model, images, SUPPORT, ["new"], EnrollSettings(calibrate=False))
    assert model.thresholds.tolist() == [0.0] and model.scales.tolist() == [1.0]


def test_a_string_of_names_is_refused():
    from fewsight.data import DigitsDataset

    with pytest.raises(InvalidArgumentError, match="names: expected a sequence of class names"):
        enroll_from_dataset(tiny_dldenet(), DigitsDataset("train", 4, seed=0), names="89")
