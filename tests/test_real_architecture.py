"""The real Stable Diffusion 2.1-base + depth-ControlNet architecture (random weights, small latents, CPU).

What users load has the layer layout built here from the shipped configs: LoRA targets,
routing, ControlNet conditioning and the diffusers LoRA format are checked on it.
Expected figures come from the published models and from hand counts of their blocks.
"""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from piva.guidance import SOURCE, TARGET, GuidanceConfig, ScoreDistillation
from piva.guidance.adapters import ATTENTION_MODULES, BASE, DualAdapters
from piva.prior.architectures import build_random_prior, parameter_count

from conftest import per_adapter_reference

pytestmark = pytest.mark.slow
SRC, TGT = "a round cake on a plate", "a square cake on a plate"
PIXELS = 64  # 8x8 latents: the smallest size the UNet's three down-samplings take


def test_parameter_counts_are_the_published_ones():
    prior = build_random_prior(device="meta")
    d, layers, vocab = 1024, 23, 49408
    per_layer = 12 * d * d + 13 * d  # q,k,v,out (+bias), fc1/fc2 (+bias), two layer norms
    assert parameter_count(prior.text_encoder) == layers * per_layer + vocab * d + 77 * d + 2 * d
    assert round(parameter_count(prior.unet) / 1e6, 1) == 865.9  # SD 2.x UNet
    assert round(parameter_count(prior.vae) / 1e6, 1) == 83.7  # SD's KL-f8 autoencoder
    assert round(parameter_count(prior.controlnet) / 1e6) == 364  # the UNet's encoder + zero convs
    assert prior.vae_scale_factor == 8 and prior.resolution == 512


def test_every_attention_projection_of_both_models_carries_both_adapters():
    prior = build_random_prior(device="meta")
    DualAdapters(prior, rank=4)  # on meta: the layout without the memory
    # transformer blocks: UNet down 3x2 + mid 1 + up 3x3 = 16, ControlNet down 3x2 + mid 1 = 7; two attentions each
    for model, blocks in ((prior.unet, 16), (prior.controlnet, 7)):
        projections = [
            (n, m) for n, m in model.named_modules() if any(n.endswith(f".{a}") for a in ATTENTION_MODULES)
            and (".attn1." in n or ".attn2." in n)
        ]
        assert len(projections) == blocks * 2 * len(ATTENTION_MODULES)
        for name, module in projections:
            assert isinstance(module, LoraLayer), name
            assert set(module.lora_A) == {SOURCE, TARGET}, name
        assert sum(isinstance(m, LoraLayer) for m in model.modules()) == len(projections)  # nothing else


@pytest.fixture(scope="module")
def real():
    prior = build_random_prior(device="cpu", dtype="float32")
    sd = ScoreDistillation(prior, GuidanceConfig(mode="piva", source_prompt=SRC, target_prompt=TGT))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct adapters, so that routing mistakes show
        for name in (SOURCE, TARGET):
            for p in sd.adapters.parameters[name]:
                p.normal_(0, 0.02, generator=g)
    return prior, sd


def views(seed: int):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(1, 3, PIXELS, PIXELS, generator=g)
    depth = torch.rand(1, 1, PIXELS, PIXELS, generator=g) + 2
    depth[..., :10] = float("inf")
    return rgb, depth


def test_piva_step_and_adapter_update(real):
    prior, sd = real
    rgb, depth = views(1)
    source, source_depth = views(2)
    base_before = prior.unet.conv_in.weight.clone(), prior.controlnet.controlnet_mid_block.weight.clone()
    adapters_before = [p.clone() for p in sd.adapters.parameters[SOURCE] + sd.adapters.parameters[TARGET]]
    x = rgb.clone().requires_grad_(True)
    out = sd.step(x, depth=depth, source_rgb=source, step=0, generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert out.diagnostics["identity_norm"] > 0
    losses = sd.update_adapters(rgb, depth=depth, source_rgb=source, source_depth=source_depth,
                                generator=torch.Generator().manual_seed(4))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    after = sd.adapters.parameters[SOURCE] + sd.adapters.parameters[TARGET]
    assert sum(not torch.equal(a, b) for a, b in zip(adapters_before, after)) == len(after)
    assert torch.equal(base_before[0], prior.unet.conv_in.weight)
    assert torch.equal(base_before[1], prior.controlnet.controlnet_mid_block.weight)


def set_lora(prior, adapter):
    """peft's standard switching, one adapter (or none) for the whole batch."""
    for model in (prior.unet, prior.controlnet):
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.enable_adapters(adapter is not None)
                if adapter is not None:
                    m.set_adapter(adapter)


def test_routed_batch_equals_one_call_per_adapter_and_depth_reaches_the_unet(real):
    prior, sd = real
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([500, 500, 500])
    text = prior.encode_prompts(["", SRC, TGT])
    _, depth = views(6)
    control = sd.control_of(depth, z[:1])
    with torch.no_grad():
        batched = sd.adapters.predict(z, t, text, [BASE, SOURCE, TARGET], control.repeat(2, 1, 1, 1))
        separate = []
        for i, adapter in enumerate([None, SOURCE, TARGET]):
            set_lora(prior, adapter)
            kw = {}
            if adapter is not None:
                down, mid = prior.controlnet(z[i : i + 1], t[i : i + 1], encoder_hidden_states=text[i : i + 1],
                                             controlnet_cond=control, return_dict=False)
                kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            separate.append(prior.unet(z[i : i + 1], t[i : i + 1], encoder_hidden_states=text[i : i + 1], **kw).sample)
        set_lora(prior, SOURCE)
        flat = sd.control_of(torch.full_like(depth, 3.0), z[:1])
        down, mid = prior.controlnet(z[1:2], t[1:2], encoder_hidden_states=text[1:2], controlnet_cond=flat, return_dict=False)
        other_depth = prior.unet(z[1:2], t[1:2], encoder_hidden_states=text[1:2], down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid).sample
        for m in (prior.unet, prior.controlnet):  # back to what the guidance expects: no adapter outside routes
            for layer in m.modules():
                if isinstance(layer, LoraLayer):
                    layer.set_adapter([])
            for name, p in m.named_parameters():  # set_adapter froze them; both adapters train
                if ".lora_" in name:
                    p.requires_grad_(True)
    torch.testing.assert_close(batched, torch.cat(separate), rtol=1e-4, atol=1e-4)
    assert (batched[1] - batched[2]).abs().max() > 1e-3  # the adapters differ
    assert (other_depth[0] - batched[1]).abs().max() > 1e-4  # the depth map conditions the prediction


def test_saved_adapters_load_into_a_real_architecture_diffusers_pipeline(real, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    prior, sd = real
    sd.adapters.save(tmp_path / "adapters")
    unet = UNet2DConditionModel.from_config(prior.unet.config)
    unet.load_state_dict({k.replace(".base_layer", ""): v for k, v in prior.unet.state_dict().items()
                          if ".lora_" not in k})
    pipe = StableDiffusionPipeline(vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer,
                                   unet=unet, scheduler=prior.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "adapters" / TARGET)
    g = torch.Generator().manual_seed(7)
    z, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300])
    text = prior.encode_prompts([TGT])
    sd.adapters.use_controlnet = False  # the plain pipeline has no ControlNet: compare the UNet part
    try:
        with torch.no_grad():
            ours = sd.adapters.predict(z, t, text, [TARGET])
            theirs = pipe.unet(z, t, encoder_hidden_states=text).sample
    finally:
        sd.adapters.use_controlnet = True
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_v_prediction_is_turned_into_epsilon(real):
    """SD 2.1 (768) predicts v: the SDS gradient must use eps = sqrt(a) v + sqrt(1-a) z_t."""
    from diffusers import DDPMScheduler

    prior, _ = real
    eps_scheduler = prior.scheduler
    prior.scheduler = DDPMScheduler.from_config(eps_scheduler.config, prediction_type="v_prediction")
    try:
        sds = ScoreDistillation(prior, GuidanceConfig(mode="sds", target_prompt=TGT, guidance_scale=3.0))
        g = torch.Generator().manual_seed(8)
        z, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        zz = z.clone().requires_grad_(True)
        sds.step(latents=zz, t=600, noise=noise).loss.backward()
        a = prior.scheduler.alphas_cumprod[600].float()
        z_t = a.sqrt() * z + (1 - a).sqrt() * noise
        with torch.no_grad():
            v = prior.unet(z_t.repeat(2, 1, 1, 1), torch.tensor([600, 600]),
                           encoder_hidden_states=prior.encode_prompts(["", TGT])).sample
        e = a.sqrt() * v + (1 - a).sqrt() * z_t
        expected = (1 - a) * (e[0:1] + 3.0 * (e[1:2] - e[0:1]) - noise)
        torch.testing.assert_close(zz.grad, expected, rtol=1e-3, atol=1e-5)
    finally:
        prior.scheduler = eps_scheduler


def _relative_error(ours: list, theirs: list) -> float:
    a, b = torch.cat([x.flatten() for x in ours]), torch.cat([x.flatten() for x in theirs])
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("routes", [[SOURCE, TARGET], [TARGET, BASE, SOURCE]], ids=["paired", "interleaved"])
def test_fused_adapters_equal_peft_per_adapter_calls_with_gradients(real, routes):
    """piva's stacked two-adapter LoRA (the update's paired rows, and any other pattern) against peft's own
    per-adapter forward: predictions and the LoRA weights' gradients of a mixed batch within 1e-5 relative."""
    prior, sd = real
    n = len(routes)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([100, 400, 800][:n])
    text = prior.encode_prompts(["", SRC, TGT])[torch.tensor([1, 2, 0][:n])]
    _, depth = views(12)
    control = sd.control_of(depth, z[:1])
    weights = torch.randn(n, 4, 8, 8, generator=g)
    adapter_rows = sum(r != BASE for r in routes)
    out = sd.adapters.predict(z, t, text, routes, control.repeat(adapter_rows, 1, 1, 1))
    stacked = torch.autograd.grad((out * weights).sum(), sd.adapters.trainable)
    ours = {name: [] for name in (SOURCE, TARGET)}
    for layer_grads in zip(stacked[0::2], stacked[1::2]):  # per layer: A^T [2, in, r], B^T [2, r, out]
        for k, name in enumerate((SOURCE, TARGET)):
            ours[name] += [layer_grads[0][k].t(), layer_grads[1][k].t()]
    ref_out, ref_grads = per_adapter_reference(sd, z, t, text, control.repeat(adapter_rows, 1, 1, 1), routes, weights)
    assert _relative_error([out.detach()], [ref_out]) < 1e-5
    with torch.no_grad():  # a BASE row is the model with no adapter at all: bit for bit, in the same batch
        unrouted = prior.unet(z, t, encoder_hidden_states=text).sample
    for i, r in enumerate(routes):
        if r == BASE:
            assert torch.equal(out[i].detach(), unrouted[i])
    for name in (SOURCE, TARGET):
        assert ref_grads[name][1].abs().sum() > 0  # B gets gradient: the comparison is not of zeros
        assert _relative_error(ours[name], ref_grads[name]) < 1e-5, name


def test_score_rows_of_the_fused_adapters_equal_peft_per_adapter_calls(real):
    """The score's pattern (frozen-model rows first, then one row per adapter, no gradient: added in place)."""
    prior, sd = real
    routes = [BASE, BASE, SOURCE, TARGET]
    g = torch.Generator().manual_seed(13)
    z = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.full((4,), 600)
    text = prior.encode_prompts(["", SRC, TGT])[torch.tensor([2, 1, 1, 2])]
    _, depth = views(14)
    control = sd.control_of(depth, z[:1])
    with torch.no_grad():
        out = sd.adapters.predict(z, t, text, routes, control.repeat(2, 1, 1, 1))
    ref_out, _ = per_adapter_reference(sd, z, t, text, control.repeat(2, 1, 1, 1), routes)
    assert _relative_error([out], [ref_out]) < 1e-5
    assert (out[2] - out[3]).abs().max() > 1e-3  # the two adapters differ
