"""Bad input fails fast with one clear line; `piva edit-image` runs end to end offline."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from piva.cli import main
from piva.guidance import GuidanceConfig, ScoreDistillation
from piva.prior import DiffusionPrior, ModelNotFoundError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "red-cube.png"


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        DiffusionPrior.from_pretrained(tmp_path / "nope", device="cpu")


def test_folder_missing_parts(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="lacks vae, text_encoder, tokenizer, scheduler"):
        DiffusionPrior.from_pretrained(tmp_path, device="cpu")


def test_uncached_hub_id_fails_within_seconds():
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download someone/not-a-model"):
        DiffusionPrior.from_pretrained("someone/not-a-model", device="cpu")
    assert time.perf_counter() - start < 10


def test_broken_tokenizer_is_caught(tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        (broken / "tokenizer" / f).unlink(missing_ok=True)
    with pytest.raises(ModelNotFoundError, match="has only 2 tokens"):
        DiffusionPrior.from_pretrained(broken, device="cpu")


def test_controlnet_for_another_model_is_refused(tiny_dir, tmp_path):
    from piva.prior.tiny import build_tiny_prior

    other = build_tiny_prior(tmp_path / "other", block_out_channels=(16, 32), text_dim=16)
    with pytest.raises(ValueError, match="does not match the base model"):
        DiffusionPrior.from_pretrained(tiny_dir, controlnet=other / "controlnet", device="cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="piva", source_prompt="a red cube", target_prompt="  "), "target prompt is empty"),
        (dict(mode="dds", source_prompt="", target_prompt="a blue cube"), "needs a source prompt"),
        (dict(mode="vsd", source_prompt="a", target_prompt="b"), "unknown guidance mode"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuidanceConfig(**kwargs).validate()


@pytest.mark.parametrize(
    "rgb, message",
    [
        (torch.rand(3, 32, 32), r"\[B,3,H,W\]"),
        (torch.rand(1, 32, 32, 3), r"\[B,3,H,W\]"),
        (torch.rand(1, 3, 32, 32) * 255, r"must be in \[0, 1\]"),
        (torch.rand(1, 3, 32, 32) * 2 - 1, r"must be in \[0, 1\]"),
        (torch.rand(1, 3, 30, 32), "multiple of 4"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    ],
)
def test_bad_renders(prior_2d, rgb, message):
    sd = ScoreDistillation(prior_2d, GuidanceConfig(mode="dds", source_prompt="a red cube", target_prompt="a blue cube"))
    with pytest.raises(ValueError, match=message):
        sd.step(rgb, source_rgb=torch.rand(1, 3, 32, 32))


def test_nan_depth_and_missing_depth(prior):
    sd = ScoreDistillation(prior, GuidanceConfig(mode="piva", source_prompt="a red cube", target_prompt="a blue cube"))
    rgb = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="needs the render's depth"):
        sd.step(rgb)
    with pytest.raises(ValueError, match="depth contains NaN"):
        sd.step(rgb, depth=torch.full((1, 1, 32, 32), float("nan")))


def test_edit_image_cli_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "run"
    code = main(["edit-image", "--image", str(EXAMPLE), "--source", "a red cube", "--target", "a blue cube",
                 "--model", str(tiny_dir), "--steps", "4", "--out", str(out), "--device", "cpu"])
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["steps_done"] == 4 and len(record["history"]) == 4
    assert {"t", "grad_norm", "identity_norm", "source_adapter_loss", "target_adapter_loss"} <= set(record["history"][0])
    assert record["guidance"]["mode"] == "piva" and record["guidance"]["identity_weight"] == 0.4
    edited = Image.open(out / "edited.png")
    assert edited.size == (32, 32)
    strip = Image.open(out / "progress.png")
    assert strip.size[1] == 32 and strip.size[0] >= 3 * 32


def test_cli_errors_are_one_line(tiny_dir, tmp_path):
    cmd = [sys.executable, "-m", "piva.cli", "edit-image", "--image", str(EXAMPLE), "--source", "a red cube",
           "--target", "", "--model", str(tiny_dir), "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "target prompt is empty" in res.stderr
    cmd[cmd.index("--target") + 1] = "a blue cube"
    cmd[cmd.index("--model") + 1] = str(tmp_path / "missing-model")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "does not exist" in res.stderr and res.stderr.strip().count("\n") == 0


def test_renders_are_resized_to_a_size_the_model_accepts(prior_2d):
    sd = ScoreDistillation(prior_2d, GuidanceConfig(mode="sds", target_prompt="a blue cube"))
    x = torch.rand(1, 3, 30, 35, requires_grad=True)
    y = sd.fit_to_model(x)
    assert y.shape[-2:] == (32, 36)  # multiples of 4 for the tiny model (VAE x2, UNet x2)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    same = torch.rand(1, 3, 32, 32)
    assert sd.fit_to_model(same) is same
