"""Each knob declared once: CLI options made from the config dataclasses, the method's automatic rules, sizes."""

import dataclasses

import pytest

from piva.cli import _IMAGE_GUIDANCE_SKIP, build_parser
from piva.guidance import GuidanceConfig
from piva.guidance.prompts import adds_to_source, is_colour_only_edit
from piva.image.edit import ImageEditConfig


@pytest.mark.parametrize(
    "source, target, colour_only",
    [
        ("a red cube", "a blue cube", True),
        ("a red cube with a white stripe", "a blue cube with a white stripe", True),
        ("A photo of a Red car.", "a photo of a dark green car", False),  # a word added
        ("a photo of a red car", "a photo of a grey car", True),
        ("a red cube", "a red sphere", False),
        ("a red cube", "a red cube on a white plate", False),
        ("a red cube", "a red cube", False),  # no edit at all
        ("a man", "a man with a beard", False),
    ],
)
def test_colour_only_rule(source, target, colour_only):
    assert is_colour_only_edit(source, target) is colour_only


@pytest.mark.parametrize(
    "source, target, adds",
    [
        ("a red cube", "a red cube on a white plate", True),
        ("a blue cylinder", "a blue cylinder with a white stripe", True),
        ("A round cake on a plate.", "a round cake with candles on a plate", True),  # words added in the middle
        ("a red cube", "a red sphere", False),  # a shape word replaced
        ("a red sphere on a white plate", "a red cylinder on a white plate", False),
        ("a red cube", "a blue cube", False),
        ("a cube on a plate", "a plate on a cube", False),  # same words, another order
        ("a red cube", "a red cube", False),
    ],
)
def test_addition_rule(source, target, adds):
    assert adds_to_source(source, target) is adds


def test_target_only_guidance_follows_the_rule_unless_set():
    """None: 7.5 for an addition, 3 for anything else; a number is used as given."""
    cfg = GuidanceConfig(source_prompt="a red cube", target_prompt="a red cube with a black hat")
    assert cfg.target_only_guidance_scale is None and cfg.target_only_cfg == 7.5
    assert dataclasses.replace(cfg, target_prompt="a red sphere").target_only_cfg == 3.0
    assert dataclasses.replace(cfg, target_prompt="a red sphere", target_only_guidance_scale=5.0).target_only_cfg == 5.0
    with pytest.raises(ValueError, match="guidance scales"):
        dataclasses.replace(cfg, target_only_guidance_scale=0.5).validate()


def test_edit_image_options_are_made_from_the_dataclasses():
    """Every GuidanceConfig and ImageEditConfig field the 2D editor uses is an option, with the same default."""
    parser = build_parser()
    args = parser.parse_args(["edit-image", "--image", "x.png", "--source", "a", "--target", "b", "--out", "o"])
    for cls, skip in ((GuidanceConfig, _IMAGE_GUIDANCE_SKIP), (ImageEditConfig, ())):
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                assert getattr(args, f.name) == f.default, f.name
    args = parser.parse_args(["edit-image", "--image", "x.png", "--source", "a", "--target", "b", "--out", "o",
                              "--same-latent", "false", "--t-range", "0.1", "0.9", "--pixel-gradient", "decoded",
                              "--adapter-guidance-scale", "2", "--steps", "7"])
    assert (args.same_latent, args.t_range, args.pixel_gradient, args.adapter_guidance_scale, args.steps) == (
        False, [0.1, 0.9], "decoded", 2.0, 7)
    with pytest.raises(SystemExit):
        parser.parse_args(["edit-image", "--image", "x", "--source", "a", "--target", "b", "--out", "o",
                           "--pixel-gradient", "sideways"])


def test_run_size_keeps_the_anneal_in_its_place():
    pytest.importorskip("nerfstudio")
    from piva.nerfstudio.runs import TOY_SIZE, RunSize

    assert TOY_SIZE.with_edit_steps(600).anneal_step == 2 * TOY_SIZE.anneal_step
    assert TOY_SIZE.with_edit_steps(None) is TOY_SIZE
    assert RunSize(anneal_step=None).with_edit_steps(10).anneal_step is None


def test_opacity_entropy_against_hand_values():
    pytest.importorskip("nerfstudio")
    import math

    import torch

    from piva.nerfstudio.piva_pipeline import opacity_entropy

    assert opacity_entropy(torch.tensor([0.5])).item() == pytest.approx(math.log(2), rel=1e-6)
    assert opacity_entropy(torch.tensor([0.0, 1.0])).item() < 2e-3  # empty and opaque rays cost (almost) nothing
    p = 0.2
    assert opacity_entropy(torch.tensor([[p], [0.5]])).item() == pytest.approx(
        (-(p * math.log(p) + (1 - p) * math.log(1 - p)) + math.log(2)) / 2, rel=1e-6)
    acc = torch.tensor([0.3, 0.6], requires_grad=True)
    opacity_entropy(acc).backward()
    assert acc.grad[0] > 0 > acc.grad[1]  # descent pushes each ray towards its nearer end
