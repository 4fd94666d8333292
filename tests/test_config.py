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


@pytest.mark.parametrize(
    "field, value",
    [
        ("mode", "vsd"), ("identity_weight", -0.1), ("identity_weight", float("nan")),
        ("guidance_scale", 0.0), ("adapter_guidance_scale", 0.5), ("target_only_guidance_scale", -1.0),
        ("t_range", (0.5, 0.5)), ("t_range", (0.1, 1.2)), ("annealed_range", (-0.1, 0.5)), ("annealed_range", (0.3,)),
        ("adapter_rank", 0), ("adapter_rank", 2.5), ("adapter_lr", 0.0), ("adapter_lr", -1e-4),
        ("adapter_update_every", 0), ("noise_draws", 0), ("anneal_step", -1), ("target_only_steps", -1),
        ("pixel_gradient", "jacobian"), ("same_latent", "yes"), ("use_controlnet", None), ("target_prompt", None),
        ("adapter_routing", "lora"), ("adapter_target_from_score", 1), ("cuda_graphs", "on"),
    ],
)
def test_every_bad_field_is_refused_where_the_config_is_made(field, value):
    """At construction (CLI, YAML, sweep, `dataclasses.replace`), one line that names the field and the value."""
    with pytest.raises(ValueError) as err:
        GuidanceConfig(**{field: value})
    message = str(err.value)
    assert "\n" not in message and (field in message or "mode" in message) and repr(value) in message, message
    with pytest.raises(ValueError):
        dataclasses.replace(GuidanceConfig(source_prompt="a red cube", target_prompt="a blue cube"), **{field: value})
    cfg = GuidanceConfig(source_prompt="a red cube", target_prompt="a blue cube")
    setattr(cfg, field, value)  # changed in place after construction: validate() still refuses it
    with pytest.raises(ValueError):
        cfg.validate()


def test_cuda_graphs_and_gradient_checkpointing_are_refused_together():
    with pytest.raises(ValueError, match="choose one"):
        GuidanceConfig(cuda_graphs=True, adapter_checkpointing=True)


def test_prompts_may_come_after_the_config():
    """nerfstudio's defaults and the benchmark build the config without prompts and fill them in later:
    construction accepts empty prompts, validate() (run before any model loads) refuses them."""
    cfg = GuidanceConfig(identity_weight=0.2, anneal_step=2000, same_latent=False)
    with pytest.raises(ValueError, match="target prompt is empty"):
        cfg.validate()
    with pytest.raises(ValueError, match="needs a source prompt"):
        dataclasses.replace(cfg, target_prompt="a blue cube").validate()
    with pytest.raises(ValueError, match="target prompt is empty"):
        dataclasses.replace(cfg, source_prompt="a red cube", target_prompt=" \t").validate()
    dataclasses.replace(cfg, source_prompt="a red cube", target_prompt="a blue cube").validate()
    GuidanceConfig(mode="sds", target_prompt="a blue cube").validate()  # SDS needs no source prompt
    # The edges that work are accepted: lambda 0 (the sweep's ablation), U[0, T) and a range list from YAML.
    ok = GuidanceConfig(identity_weight=0, t_range=[0, 1], annealed_range=[0.02, 0.5], guidance_scale=1.0)
    assert ok.t_range == (0.0, 1.0) and ok.annealed_range == (0.02, 0.5)


def test_every_registered_method_config_is_valid():
    pytest.importorskip("nerfstudio")
    from piva.nerfstudio.piva_config import METHODS

    for name, spec in METHODS.items():
        guidance = spec.config.pipeline.guidance
        dataclasses.replace(guidance, source_prompt="a red cube", target_prompt="a blue cube").validate()


@pytest.mark.parametrize("flag", ["mixed_precision", "use_grad_scaler"])
@pytest.mark.parametrize("method", ["piva", "piva-dds", "piva-splat"])
def test_mixed_precision_is_refused_before_anything_loads(flag, method, tmp_path, capsys):
    """The pipeline backpropagates the score outside nerfstudio's AMP grad scaler, whose unscale would shrink
    it 65536-fold: `ns-train piva --mixed-precision True` stops in one line at set-up, before data or weights."""
    pytest.importorskip("nerfstudio")
    import copy

    from piva.nerfstudio.piva_config import METHODS
    from piva.nerfstudio.piva_trainer import PivaTrainer

    config = copy.deepcopy(METHODS[method].config)
    config.pipeline.guidance = dataclasses.replace(config.pipeline.guidance, source_prompt="a red cube",
                                                   target_prompt="a blue cube")
    config.pipeline.datamanager.data = tmp_path / "no-data-here"  # set-up would fail on it: the refusal comes first
    config.output_dir = tmp_path
    assert not getattr(config, flag)  # the methods' own setting
    setattr(config, flag, True)
    with pytest.raises(SystemExit) as stop:
        PivaTrainer(config)
    message = str(stop.value)
    assert message.startswith("piva: error:") and "\n" not in message, message
    assert f"--{flag.replace('_', '-')} False" in message and method in message
    setattr(config, flag, False)
    PivaTrainer(config)  # the same config otherwise passes the trainer's checks (nothing loads until setup())
