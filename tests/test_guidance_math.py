"""SDS / DDS / PiVa gradients against hand-written formulas on fixed noise and t.

The expected values use the raw diffusers/peft modules and the scheduler's
closed form, never piva's own helpers.
"""

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from conftest import randomize_adapters
from piva.guidance import GuidanceConfig, ScoreDistillation
from piva.prior import DiffusionPrior

SRC, TGT = "a red cube", "a blue cube on a white plate"
T = 437
CFG = 7.5


def alphas_bar() -> torch.Tensor:
    """SD's scaled_linear schedule, written out."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def embed(prior, text, b):
    ids = prior.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return prior.text_encoder(ids)[0].expand(b, -1, -1)


def set_lora(prior, adapter):
    """Standard peft switching: adapter=None disables LoRA everywhere."""
    for model in (prior.unet, prior.controlnet):
        if model is None:
            continue
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.enable_adapters(adapter is not None)
                if adapter is not None:
                    m.set_adapter(adapter)


@torch.no_grad()
def eps(prior, z_t, text, control=None, v_pred=False):
    b = z_t.shape[0]
    t = torch.full((b,), T)
    kwargs = {}
    if control is not None:
        down, mid = prior.controlnet(z_t, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        kwargs = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    out = prior.unet(z_t, t, encoder_hidden_states=text, **kwargs).sample
    if v_pred:
        a = alphas_bar()[T]
        out = a.sqrt() * out + (1 - a).sqrt() * z_t
    return out


def inverse_depth_image(depth, size):
    """1/depth of the foreground scaled per image to [0.1, 1]; background (0 or inf) black."""
    fg = (depth > 0) & (depth < float("inf"))
    inv = 1.0 / depth
    lo = torch.stack([inv[i][fg[i]].min() for i in range(len(depth))]).view(-1, 1, 1, 1)
    hi = torch.stack([inv[i][fg[i]].max() for i in range(len(depth))]).view(-1, 1, 1, 1)
    img = torch.where(fg, (inv - lo) / (hi - lo) * 0.9 + 0.1, torch.zeros(()))
    return torch.nn.functional.interpolate(img, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


def run_step(prior, mode, z, noise, **kw):
    extra = {k: kw.pop(k) for k in ("depth", "source_latents") if k in kw}
    sd = ScoreDistillation(prior, GuidanceConfig(mode=mode, source_prompt=SRC, target_prompt=TGT, **kw))
    z = z.clone().requires_grad_(True)
    out = sd.step(latents=z, t=T, noise=noise, **extra)
    out.loss.backward()
    return sd, z.grad, out


@pytest.fixture
def latents():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 16, 16, generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    z_src = torch.randn(2, 4, 16, 16, generator=g)
    return z, noise, z_src


def test_sds_gradient(prior, latents):
    z, noise, _ = latents
    _, grad, _ = run_step(prior, "sds", z, noise)
    a = alphas_bar()[T]
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    e_u, e_c = eps(prior, z_t, embed(prior, "", 2)), eps(prior, z_t, embed(prior, TGT, 2))
    expected = (1 - a) * (e_u + CFG * (e_c - e_u) - noise) / 2
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=2e-5)


def test_sds_gradient_v_prediction(tiny_v_dir, latents):
    prior = DiffusionPrior.from_pretrained(tiny_v_dir, device="cpu")
    z, noise, _ = latents
    _, grad, _ = run_step(prior, "sds", z, noise)
    a = alphas_bar()[T]
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    e_u = eps(prior, z_t, embed(prior, "", 2), v_pred=True)
    e_c = eps(prior, z_t, embed(prior, TGT, 2), v_pred=True)
    expected = (1 - a) * (e_u + CFG * (e_c - e_u) - noise) / 2
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=2e-5)


def test_the_models_own_guidance_scale_is_used_unless_the_method_sets_one(tiny_dir, tmp_path, latents):
    """A model folder's piva.json sets the CFG of a method that sets none (the toy prior ships 3); the SDS
    gradient then matches the hand formula at that scale, and an explicit guidance_scale wins."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / "piva.json").write_text('{"guidance_scale": 3.0}')
    prior = DiffusionPrior.from_pretrained(folder, device="cpu")
    assert prior.guidance_scale == 3.0 and DiffusionPrior.from_pretrained(tiny_dir, device="cpu").guidance_scale == 7.5
    z, noise, _ = latents
    a = alphas_bar()[T]
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    e_u, e_c = eps(prior, z_t, embed(prior, "", 2)), eps(prior, z_t, embed(prior, TGT, 2))
    for given, scale in ((None, 3.0), (CFG, CFG)):
        sd, grad, _ = run_step(prior, "sds", z, noise, guidance_scale=given)
        assert sd.settings()["guidance_scale_resolved"] == scale
        torch.testing.assert_close(grad, (1 - a) * (e_u + scale * (e_c - e_u) - noise) / 2, rtol=1e-4, atol=2e-5)
    (folder / "piva.json").write_text('{"guidance": 3}')
    with pytest.raises(ValueError, match="piva.json: expected"):
        DiffusionPrior.from_pretrained(folder, device="cpu")


def dds_by_hand(prior, z_t, zs_t):
    u, ct, cs = embed(prior, "", 2), embed(prior, TGT, 2), embed(prior, SRC, 2)
    e_tgt = eps(prior, z_t, u) + CFG * (eps(prior, z_t, ct) - eps(prior, z_t, u))
    e_src = eps(prior, zs_t, u) + CFG * (eps(prior, zs_t, cs) - eps(prior, zs_t, u))
    return e_tgt - e_src


def test_dds_gradient_true_source(prior, latents):
    z, noise, z_src = latents
    _, grad, _ = run_step(prior, "dds", z, noise, source_latents=z_src, same_latent=False)
    a = alphas_bar()[T]
    z_t, zs_t = (a.sqrt() * x + (1 - a).sqrt() * noise for x in (z, z_src))
    torch.testing.assert_close(grad, (1 - a) * dds_by_hand(prior, z_t, zs_t) / 2, rtol=1e-4, atol=2e-5)


def test_dds_gradient_same_latent(prior, latents):
    z, noise, _ = latents
    _, grad, _ = run_step(prior, "dds", z, noise, same_latent=True)
    a = alphas_bar()[T]
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    # The full four-evaluation CFG formula, with z_t in both branches.
    torch.testing.assert_close(grad, (1 - a) * dds_by_hand(prior, z_t, z_t) / 2, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("adapter_cfg", [1.0, 2.0])
def test_piva_gradient(prior, latents, adapter_cfg):
    z, noise, _ = latents
    lam = 0.4
    depth = torch.rand(2, 1, 32, 32) * 2 + 2
    depth[0, :, :6], depth[1, :, :, -5:] = float("inf"), 0.0  # background, both ways of marking it
    # Build the adapters, then give them distinct weights so the regulariser is not trivially zero.
    sd = ScoreDistillation(
        prior,
        GuidanceConfig(mode="piva", source_prompt=SRC, target_prompt=TGT, identity_weight=lam,
                       adapter_guidance_scale=adapter_cfg),
    )
    randomize_adapters(prior.unet, 1)
    randomize_adapters(prior.controlnet, 2)
    zz = z.clone().requires_grad_(True)
    out = sd.step(latents=zz, depth=depth, t=T, noise=noise)
    out.loss.backward()

    a = alphas_bar()[T]
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    control = inverse_depth_image(depth, (32, 32))
    set_lora(prior, None)
    dds = dds_by_hand(prior, z_t, z_t)

    def adapter_eps(name, text):
        set_lora(prior, name)
        e_c = eps(prior, z_t, embed(prior, text, 2), control)
        e_u = eps(prior, z_t, embed(prior, "", 2), control)
        return e_u + adapter_cfg * (e_c - e_u)

    e_psi, e_phi = adapter_eps("source", SRC), adapter_eps("target", TGT)
    assert (e_psi - e_phi).abs().max() > 1e-3
    expected = (1 - a) * (dds + lam * (e_psi - e_phi)) / 2
    torch.testing.assert_close(zz.grad, expected, rtol=1e-4, atol=2e-5)
    # the logged norms (read back from the device in one go) are those of the hand-computed terms
    norms = {"delta_norm": dds.norm(), "identity_norm": (e_psi - e_phi).norm(), "grad_norm": (2 * expected).norm()}
    for key, value in norms.items():
        assert out.diagnostics[key] == pytest.approx(float(value), rel=1e-4), key


def test_gradient_reaches_pixels_through_the_encoder(prior_2d):
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    sd = ScoreDistillation(prior_2d, GuidanceConfig(mode="sds", target_prompt=TGT))
    x = rgb.clone().requires_grad_(True)
    sd.step(x, t=T, noise=noise, generator=torch.Generator().manual_seed(9)).loss.backward()

    x2 = rgb.clone().requires_grad_(True)
    vae = prior_2d.vae
    z = vae.encode(2 * x2 - 1).latent_dist.sample(torch.Generator().manual_seed(9)) * vae.config.scaling_factor
    a = alphas_bar()[T]
    z_t = (a.sqrt() * z + (1 - a).sqrt() * noise).detach()
    e_u, e_c = eps(prior_2d, z_t, embed(prior_2d, "", 1)), eps(prior_2d, z_t, embed(prior_2d, TGT, 1))
    (expected,) = torch.autograd.grad(z, x2, (1 - a) * (e_u + CFG * (e_c - e_u) - noise))
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=2e-5)


def test_decoded_pixel_gradient_is_the_decoded_latent_step(prior_2d):
    """pixel_gradient="decoded": d loss / d rgb = D(z) - D(z - g), g the hand-computed SDS latent gradient."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    sd = ScoreDistillation(prior_2d, GuidanceConfig(mode="sds", target_prompt=TGT, pixel_gradient="decoded"))
    x = rgb.clone().requires_grad_(True)
    sd.step(x, t=T, noise=noise, generator=torch.Generator().manual_seed(9)).loss.backward()

    vae = prior_2d.vae
    with torch.no_grad():
        z = vae.encode(2 * rgb - 1).latent_dist.sample(torch.Generator().manual_seed(9)) * vae.config.scaling_factor
        a = alphas_bar()[T]
        z_t = a.sqrt() * z + (1 - a).sqrt() * noise
        e_u, e_c = eps(prior_2d, z_t, embed(prior_2d, "", 1)), eps(prior_2d, z_t, embed(prior_2d, TGT, 1))
        latent_grad = (1 - a) * (e_u + CFG * (e_c - e_u) - noise)

        def decode(lat):
            return (vae.decode(lat / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

        expected = decode(z) - decode(z - latent_grad)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="pixel_gradient"):
        GuidanceConfig(mode="sds", target_prompt=TGT, pixel_gradient="jacobian").validate()


def test_piva_with_zero_lambda_equals_dds(tiny_dir, latents):
    z, noise, _ = latents
    depth = torch.rand(2, 1, 32, 32) + 1
    p1 = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    _, g_piva, _ = run_step(p1, "piva", z, noise, identity_weight=0.0, depth=depth)
    p2 = DiffusionPrior.from_pretrained(tiny_dir, device="cpu")
    _, g_dds, _ = run_step(p2, "dds", z, noise, same_latent=True)
    # Equal up to fp32 rounding: PiVa's UNet batch has 8 rows, DDS's 4, and CPU matmuls round differently
    # per batch size (max 3e-6 of |g| <= 0.26 measured with torch 2.13; lambda = 0.4 moves it by 1.5e-2).
    torch.testing.assert_close(g_piva, g_dds, rtol=1e-5, atol=1e-5)
    # ...and with lambda > 0 it does not.
    p3 = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    _, g_reg, _ = run_step(p3, "piva", z, noise, identity_weight=0.4, depth=depth)
    assert (g_reg - g_dds).abs().max() > 1e-4


def test_same_latent_and_true_source_differ_only_through_the_source(prior_2d, latents):
    z, noise, z_src = latents
    _, g_same, _ = run_step(prior_2d, "dds", z, noise, same_latent=True)
    # True source equal to the edited latents: identical to the same-latent trick.
    _, g_true_eq, _ = run_step(prior_2d, "dds", z, noise, same_latent=False, source_latents=z.clone())
    torch.testing.assert_close(g_same, g_true_eq, rtol=1e-4, atol=2e-5)
    # A different original: the true-source gradient changes, the same-latent one ignores it.
    _, g_true, _ = run_step(prior_2d, "dds", z, noise, same_latent=False, source_latents=z_src)
    _, g_same2, _ = run_step(prior_2d, "dds", z, noise, same_latent=True, source_latents=z_src)
    assert (g_true - g_same).abs().max() > 1e-3
    torch.testing.assert_close(g_same2, g_same, rtol=0, atol=0)


def test_same_latent_default_per_mode():
    assert GuidanceConfig(mode="piva", source_prompt="a", target_prompt="b").uses_same_latent
    assert not GuidanceConfig(mode="dds", source_prompt="a", target_prompt="b").uses_same_latent


def test_annealed_timesteps():
    from piva.guidance import AnnealedTimesteps

    s = AnnealedTimesteps(1000, (0.02, 0.98), (0.02, 0.5), anneal_step=10)
    g = torch.Generator().manual_seed(0)
    early = [s.sample(0, g) for _ in range(400)]
    late = [s.sample(10, g) for _ in range(400)]
    assert min(early) >= 20 and max(early) < 980 and max(early) > 600
    assert min(late) >= 20 and max(late) < 500


def test_noise_draws_average_single_draws(prior, latents):
    """noise_draws=2 on noises (n1, n2) is the mean of two one-draw steps: for DDS and for PiVa with depth."""
    z, noise, z_src = latents
    noise2 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(11))
    _, g1, _ = run_step(prior, "dds", z, noise, source_latents=z_src)
    _, g2, _ = run_step(prior, "dds", z, noise2, source_latents=z_src)
    _, g12, _ = run_step(prior, "dds", z, torch.cat([noise, noise2]), source_latents=z_src, noise_draws=2)
    torch.testing.assert_close(g12, (g1 + g2) / 2, rtol=1e-4, atol=1e-6)

    sd = ScoreDistillation(prior, GuidanceConfig(mode="piva", source_prompt=SRC, target_prompt=TGT))
    randomize_adapters(prior.unet, 1)
    randomize_adapters(prior.controlnet, 2)
    depth = torch.rand(2, 1, 32, 32) * 2 + 2
    grads = []
    for draws, n in ((1, noise), (1, noise2), (2, torch.cat([noise, noise2]))):
        sd.config.noise_draws = draws
        zz = z.clone().requires_grad_(True)
        sd.step(latents=zz, depth=depth, t=T, noise=n).loss.backward()
        grads.append(zz.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-4
    torch.testing.assert_close(grads[2], (grads[0] + grads[1]) / 2, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="noise_draws"):
        sd.step(latents=z, depth=depth, t=T, noise=noise)


def test_target_only_steps_score_sds_first_then_the_mode(prior, latents):
    """A piva edit with target_only_steps=K: the hand SDS gradient (its own CFG, no identity term) at steps < K,
    PiVa's from K. SRC -> TGT replaces a word, so the rule's target-only CFG is 3."""
    z, noise, z_src = latents
    sd = ScoreDistillation(prior, GuidanceConfig(mode="piva", source_prompt=SRC, target_prompt=TGT, same_latent=False,
                                                 target_only_steps=5))
    randomize_adapters(prior.unet, 1)
    randomize_adapters(prior.controlnet, 2)
    depth = torch.rand(2, 1, 32, 32) * 2 + 2
    grads = []
    for step in (4, 5):
        zz = z.clone().requires_grad_(True)
        sd.step(latents=zz, depth=depth, source_latents=z_src, t=T, noise=noise, step=step).loss.backward()
        grads.append(zz.grad)
    a = alphas_bar()[T]
    z_t, zs_t = (a.sqrt() * x + (1 - a).sqrt() * noise for x in (z, z_src))
    set_lora(prior, None)
    e_u, e_c = eps(prior, z_t, embed(prior, "", 2)), eps(prior, z_t, embed(prior, TGT, 2))
    torch.testing.assert_close(grads[0], (1 - a) * (e_u + 3.0 * (e_c - e_u) - noise) / 2, rtol=1e-4, atol=2e-5)
    dds = dds_by_hand(prior, z_t, zs_t)  # the mode's own CFG (7.5) from step K
    control = inverse_depth_image(depth, (32, 32))
    set_lora(prior, "source")
    e_psi = eps(prior, z_t, embed(prior, SRC, 2), control)
    set_lora(prior, "target")
    e_phi = eps(prior, z_t, embed(prior, TGT, 2), control)
    torch.testing.assert_close(grads[1], (1 - a) * (dds + 0.4 * (e_psi - e_phi)) / 2, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="target_only_steps"):
        GuidanceConfig(mode="piva", source_prompt=SRC, target_prompt=TGT, target_only_steps=-1).validate()
