"""The two LoRA adapters: isolation, routing of renders, frozen base, diffusers-format persistence."""

import pytest
import torch

from piva.guidance import SOURCE, TARGET, GuidanceConfig, ScoreDistillation, depth_to_control
from piva.prior import DiffusionPrior

SRC, TGT = "a red cube", "a blue cube"


def make(prior, **kw):
    return ScoreDistillation(prior, GuidanceConfig(mode="piva", source_prompt=SRC, target_prompt=TGT, **kw))


def adapter_params(sd, name):
    return [p.detach().clone() for p in sd.adapters.parameters[name]]


def base_state(prior):
    return {
        f"{i}.{k.replace('.base_layer', '')}": v.detach().clone()
        for i, m in enumerate(prior.modules())
        for k, v in m.state_dict().items()
        if ".lora_" not in k
    }


def renders(seed, b=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 32, 32, generator=g), torch.rand(b, 1, 32, 32, generator=g) + 2


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_base_weights_bit_identical_after_many_steps(prior):
    before = base_state(prior)
    sd = make(prior)
    assert all(not p.requires_grad for m in prior.modules() for k, p in m.named_parameters() if ".lora_" not in k)
    rgb0, depth = renders(0)
    x = torch.nn.Parameter(rgb0.clone())
    opt = torch.optim.SGD([x], lr=0.01)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        out = sd.step(x.clamp(0, 1), depth=depth, step=i, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sd.update_adapters(x.clamp(0, 1), depth=depth, source_rgb=rgb0, source_depth=depth, generator=g)
    after = base_state(prior)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(x.detach(), rgb0)  # the image itself did move


def test_each_adapter_learns_only_from_its_own_renders(tiny_dir):
    """The source adapter's update never depends on edited renders, the target's never on originals."""
    edited_a, depth_a = renders(1)
    edited_b, depth_b = renders(2)
    original_a, odepth_a = renders(3)
    original_b, odepth_b = renders(4)

    def one_update(edited, depth, original, odepth):
        prior = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
        torch.manual_seed(0)
        sd = make(prior)
        # A step makes non-zero LoRA-B so that both adapters' parameters receive gradient.
        with torch.no_grad():
            for p in sd.adapters.parameters[SOURCE] + sd.adapters.parameters[TARGET]:
                p.add_(0.01)
        sd.update_adapters(edited, depth=depth, source_rgb=original, source_depth=odepth,
                           generator=torch.Generator().manual_seed(5))
        return adapter_params(sd, SOURCE), adapter_params(sd, TARGET)

    s1, t1 = one_update(edited_a, depth_a, original_a, odepth_a)
    s2, t2 = one_update(edited_b, depth_b, original_a, odepth_a)  # other edited render
    s3, t3 = one_update(edited_a, depth_a, original_b, odepth_b)  # other original render
    assert same(s1, s2) and not same(t1, t2)
    assert same(t1, t3) and not same(s1, s3)


def test_memory_savers_leave_the_step_unchanged(tiny_dir):
    """Checkpointing (adapters' update, VAE encoder) and attention slicing change memory, not the pixels' gradient
    or the adapters' step: the update's re-run blocks must still route each row to its adapter."""
    rgb, depth = renders(8)
    original, odepth = renders(9)
    result = {}
    for name, kw in {"plain": {}, "adapter": dict(adapter_checkpointing=True), "encoder": dict(encoder_checkpointing=True),
                     "slicing": dict(attention_slicing=True)}.items():
        prior = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
        torch.manual_seed(0)
        sd = make(prior, **kw)
        with torch.no_grad():
            for p in sd.adapters.parameters[SOURCE] + sd.adapters.parameters[TARGET]:
                p.add_(0.01)
        x = rgb.clone().requires_grad_(True)
        out = sd.step(x, depth=depth, source_rgb=original, step=0, generator=torch.Generator().manual_seed(3))
        (grad,) = torch.autograd.grad(out.loss, x)
        losses = sd.update_adapters(rgb, depth=depth, source_rgb=original, source_depth=odepth,
                                    generator=torch.Generator().manual_seed(5))
        savers = {"adapter": all(m.is_gradient_checkpointing for m in sd.adapters.models.values()),
                  "encoder": prior.vae.is_gradient_checkpointing,
                  "slicing": all(type(p).__name__ == "SlicedAttnProcessor" for p in prior.unet.attn_processors.values())}
        assert savers == {k: k == name for k in savers}, (name, savers)  # the variant runs with its saver, alone
        result[name] = (grad, losses, adapter_params(sd, SOURCE) + adapter_params(sd, TARGET))
    assert result["plain"][0].abs().sum() > 0 and result["plain"][1]["target_adapter_loss"] > 0
    (g1, l1, p1), *others = result.values()
    for g2, l2, p2 in others:
        assert (g1 - g2).norm() < 1e-4 * g1.norm()  # sliced attention sums in another order: float noise only
        assert l1 == pytest.approx(l2, rel=1e-5)
        assert len(p1) == len(p2) > 0
        for a, b in zip(p1, p2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adapters_update_every_kth_call(prior):
    """k=3: both adapters' weights move at calls 1, 4, 7 and stay bit-identical at the calls between."""
    sd = make(prior, adapter_update_every=3)
    rgb, depth = renders(0)
    original, odepth = renders(1)
    moved, reported = [], []
    for _ in range(7):
        before = {name: adapter_params(sd, name) for name in (SOURCE, TARGET)}
        reported.append(bool(sd.update_adapters(rgb, depth=depth, source_rgb=original, source_depth=odepth)))
        moved.append(tuple(not same(before[name], adapter_params(sd, name)) for name in (SOURCE, TARGET)))
    updates = [True, False, False, True, False, False, True]
    assert moved == [(u, u) for u in updates]
    assert reported == updates


def test_an_adapter_update_changes_only_adapter_parameters(prior):
    sd = make(prior)
    per_adapter = lambda k: ".lora_A." in k or ".lora_B." in k  # noqa: E731  peft's keys (views of the stacked weights)
    lora_before = {k: v.clone() for k, v in prior.unet.state_dict().items() if per_adapter(k)}
    rgb, depth = renders(0)
    for _ in range(3):
        sd.update_adapters(rgb, depth=depth, source_rgb=rgb, source_depth=depth)
    lora_after = {k: v for k, v in prior.unet.state_dict().items() if per_adapter(k)}
    changed = {k.split(".lora_")[1].split(".")[1] for k in lora_before if not torch.equal(lora_before[k], lora_after[k])}
    assert changed == {SOURCE, TARGET}


def test_calls_outside_a_route_run_the_base_model(tiny_dir):
    """After injection peft would leave the last adapter (target) active: a UNet/ControlNet call outside
    `route_adapters` must equal the same prior without any adapters, and differ from the target-routed call."""
    from conftest import randomize_adapters

    prior = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    sd = make(prior)
    for k, model in enumerate(sd.adapters.models.values()):
        randomize_adapters(model, 11 + k)
    plain = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, prior.unet.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([300, 700])
    text = torch.cat([sd.source_text, sd.target_text])
    control = sd.control_of(renders(4, b=2)[1], z)

    def unrouted(p):
        down, mid = p.controlnet(z, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        return p.unet(z, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample

    with torch.no_grad():
        base = unrouted(plain)
        routed = sd.adapters.predict(z, t, text, [TARGET, TARGET], control)
        outside = unrouted(prior)  # after a routed call too: the route ends with its `with` block
        unet_alone = prior.unet(z, t, encoder_hidden_states=text).sample
        unet_alone_base = plain.unet(z, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(outside, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unet_alone, unet_alone_base, rtol=1e-5, atol=1e-6)
    assert (routed - base).abs().max() > 1e-2
    assert all(p.requires_grad for p in sd.adapters.trainable)  # still trained


def test_adapters_round_trip_in_diffusers_format(tiny_dir, tmp_path):
    prior = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    sd = make(prior)
    with torch.no_grad():
        for i, p in enumerate(sd.adapters.parameters[SOURCE] + sd.adapters.parameters[TARGET]):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(i))
    sd.adapters.save(tmp_path / "adapters")
    assert (tmp_path / "adapters" / TARGET / "pytorch_lora_weights.safetensors").is_file()

    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    depth = torch.rand(1, 1, 32, 32) + 1
    ref = sd.step(latents=z, depth=depth, t=500, noise=noise).grad

    fresh = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    sd2 = make(fresh)
    assert not torch.allclose(sd2.step(latents=z, depth=depth, t=500, noise=noise).grad, ref)
    sd2.adapters.load(tmp_path / "adapters")
    torch.testing.assert_close(sd2.step(latents=z, depth=depth, t=500, noise=noise).grad, ref, rtol=1e-5, atol=1e-6)

    # diffusers' own loader reads the UNet part: its predictions match our target adapter's.
    plain = DiffusionPrior.from_pretrained(tiny_dir, device="cpu")
    plain.unet.load_lora_adapter(
        str(tmp_path / "adapters" / TARGET), weight_name="pytorch_lora_weights.safetensors", prefix="unet", adapter_name="edited"
    )
    emb = plain.encode_prompts([TGT])
    t = torch.tensor([300])
    ours_2d = make(DiffusionPrior.from_pretrained(tiny_dir, device="cpu"), use_controlnet=False)
    ours_2d.adapters.load(tmp_path / "adapters")
    with torch.no_grad():
        theirs = plain.unet(z, t, encoder_hidden_states=emb).sample
        ours = ours_2d.adapters.predict(z, t, emb, [TARGET])
        base = ours_2d.adapters.predict(z, t, emb, ["__base__"])
    assert not torch.allclose(ours, base, atol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_loading_adapters_of_another_rank_fails_clearly(tiny_dir, tmp_path):
    p1 = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    make(p1, adapter_rank=4).adapters.save(tmp_path / "a")
    p2 = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    with pytest.raises(ValueError, match="does not fit this model"):
        make(p2, adapter_rank=8).adapters.load(tmp_path / "a")


def test_second_adapter_pair_on_one_prior_is_refused(prior):
    make(prior)
    with pytest.raises(ValueError, match="already carries piva adapters"):
        make(prior)


def test_depth_to_control_by_hand():
    """Inverse depth scaled per image to [0.1, 1] (near bright); background (0 or inf) is 0, on 3 channels."""
    inf = float("inf")
    depth = torch.tensor([[[1.0, 2.0], [0.0, inf]], [[4.0, 4.0], [2.0, 0.0]], [[0.0, inf], [inf, 0.0]]])
    expected = torch.tensor([
        [[1.0, 0.1], [0.0, 0.0]],  # 1/d = 1, 0.5: nearest -> 1, farthest -> 0.1
        [[0.1, 0.1], [1.0, 0.0]],  # 1/d = 0.25, 0.25, 0.5: normalised within this image only
        [[0.0, 0.0], [0.0, 0.0]],  # all background
    ])
    out = depth_to_control(depth, (2, 2))  # [B,H,W] is accepted too
    assert out.shape == (3, 3, 2, 2)
    torch.testing.assert_close(out, expected[:, None].expand(3, 3, 2, 2), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="depth must be"):
        depth_to_control(torch.ones(1, 2, 4, 4), (4, 4))


def _routed_predictions(sd, seed=3):
    """Each adapter pattern the method uses (and a swapped one) on fixed inputs, with distinct adapter weights."""
    from conftest import randomize_adapters

    from piva.guidance.adapters import BASE

    for k, model in enumerate(sd.adapters.models.values()):
        randomize_adapters(model, seed + k)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, sd.prior.unet.config.in_channels, 8, 8, generator=g)
    text = torch.cat([sd.source_text, sd.target_text])
    _, depth = renders(seed, b=2)
    control = sd.control_of(depth, z)
    t = torch.tensor([300, 700])
    with torch.no_grad():
        return [sd.adapters.predict(z, t, text, r, control if BASE not in r else control[1:])
                for r in ([SOURCE, TARGET], [TARGET, SOURCE], [SOURCE, TARGET], [BASE, TARGET])]


def _edit_steps(sd, n=3):
    """n PiVa steps (score + adapter update) on fixed renders; returns the pixel grads and adapter losses."""
    rgb0, depth = renders(5)
    g = torch.Generator().manual_seed(0)
    grads, losses = [], []
    for i in range(n):
        x = rgb0.clone().requires_grad_(True)
        out = sd.step(x, depth=depth, step=i, generator=g)
        (grad,) = torch.autograd.grad(out.loss, x)
        grads.append(grad)
        losses.append(sd.update_adapters(x.detach(), depth=depth, source_rgb=rgb0, source_depth=depth, generator=g))
    return grads, losses


def test_routed_adapters_trace_under_torch_compile(tiny_dir):
    """A user may `torch.compile` the UNet and ControlNet (docs/performance.md): the routing hooks stay
    installed, so every row still goes to its own adapter when the pattern changes between calls, the
    edit's steps (score, update with backward) match eager ones, and nothing recompiles per call."""
    import torch._dynamo.testing

    load = lambda: make(DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu"))  # noqa: E731
    eager_grads, eager_losses = _edit_steps(load(), n=4)
    eager_routed = _routed_predictions(load())
    torch._dynamo.reset()
    # dynamo + AOT autograd as torch.compile runs them; inductor's code generation (a C++ compiler, minutes on
    # two cores) is what the backend leaves out.
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def compiled():
        sd = load()
        for model in (sd.prior.unet, sd.prior.controlnet):
            model.compile(backend=counter)  # in place: parameter names (saved adapters) stay as they are
        return sd

    try:
        grads, losses = _edit_steps(compiled(), n=4)
        frames = counter.frame_count
        routed = _routed_predictions(compiled())
    finally:
        torch._dynamo.reset()
    assert 0 < frames <= 8, frames  # the score's and the update's patterns, not one per call
    assert not torch.allclose(eager_routed[0], eager_routed[1], atol=1e-3)  # the patterns do differ
    for a, b in zip(eager_routed, routed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Two eager runs already differ by ~0.3 % of the gradient after a step (threaded CPU reductions in the update).
    for a, b in zip(eager_grads, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * float(a.abs().max()))
    for a, b in zip(eager_losses, losses):
        assert a["target_adapter_loss"] == pytest.approx(b["target_adapter_loss"], rel=1e-3)


def test_target_adapter_trained_on_the_score_calls_own_draw(tiny_dir):
    """adapter_target_from_score: the update's target rows are the step's own z_t and t (its phi row, computed
    here by hand from the step's noise), the source rows a fresh draw of their own."""
    prior = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    sd = make(prior, adapter_target_from_score=True)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 16, 16, generator=g)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    depth = renders(1)[1]
    seen = []
    hook = prior.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].detach().clone(), args[1].clone())), with_kwargs=True)
    try:
        sd.step(latents=z, depth=depth, t=321, noise=noise)
        seen.clear()
        sd.update_adapters(latents=z, depth=depth, source_latents=z, source_depth=depth, generator=g)
    finally:
        hook.remove()
    (sample, t), = seen
    a = prior.scheduler.alphas_cumprod[321].float()
    torch.testing.assert_close(sample[1:], a.sqrt() * z + (1 - a).sqrt() * noise, rtol=1e-5, atol=1e-6)
    assert t.tolist()[1] == 321 and t.tolist()[0] != 321
    assert not torch.allclose(sample[:1], sample[1:], atol=1e-3)  # the source row drew its own noise
    with pytest.raises(ValueError, match="call step"):
        sd.update_adapters(latents=z, depth=depth, source_latents=z, source_depth=depth)


def test_cuda_graphs_without_cuda_say_so_once_and_run_eager(tiny_dir):
    """On a machine without CUDA the option warns in one line and the step is the eager one."""
    import warnings as w

    from piva.guidance import graphs

    results = []
    for on in (False, True):
        graphs._WARNED.clear()
        prior = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
        torch.manual_seed(0)
        with w.catch_warnings(record=True) as caught:
            w.simplefilter("always")
            sd = make(prior, cuda_graphs=on)
            z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
            depth = renders(2)[1]
            grad = sd.step(latents=z, depth=depth, t=400, noise=torch.ones_like(z)).grad
            losses = sd.update_adapters(latents=z, depth=depth, source_latents=z, source_depth=depth,
                                        generator=torch.Generator().manual_seed(2))
        said = [str(c.message) for c in caught if "cuda_graphs" in str(c.message)]
        assert said == ([f"cuda_graphs=True needs a CUDA device (this prior is on cpu): running eager"] if on else [])
        results.append((grad, losses))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert results[0][1] == results[1][1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_equal_eager_steps(tiny_dir):
    """Captured and replayed, a PiVa edit's steps (score and update) give eager's numbers."""
    runs = []
    for on in (False, True):
        prior = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cuda",
                                               dtype="float32")
        torch.manual_seed(0)
        sd = make(prior, cuda_graphs=on)
        z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)).cuda()
        depth = renders(2)[1].cuda()
        g = torch.Generator().manual_seed(3)
        steps = []
        for i in range(7):  # eager warm-up, capture, replays
            grad = sd.step(latents=z, depth=depth, step=i, generator=g).grad
            steps.append((grad.cpu(), sd.update_adapters(latents=z, depth=depth, source_latents=z,
                                                         source_depth=depth, generator=g)))
        runs.append(steps)
    for (g1, l1), (g2, l2) in zip(*runs):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
        assert l1["target_adapter_loss"] == pytest.approx(l2["target_adapter_loss"], rel=1e-4)


@pytest.mark.parametrize("routing", ["fused", "peft"])
def test_both_routings_equal_peft_per_adapter_calls_on_the_tiny_prior(tiny_dir, routing):
    """Every routing pattern (the score's frozen rows + one row per adapter, the update's pairs, one adapter
    alone, interleaved rows) of both routings against each row alone through peft's `set_adapter`:
    predictions and the LoRA gradients (fast counterpart of the real-architecture tests)."""
    from conftest import per_adapter_reference, randomize_adapters

    from piva.guidance.adapters import BASE, PAIR_A

    prior = DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")
    sd = make(prior, adapter_routing=routing)
    assert all(hasattr(m, PAIR_A) == (routing == "fused") for m in sd.adapters.layers)
    for k, model in enumerate(sd.adapters.models.values()):
        randomize_adapters(model, 21 + k)
    g = torch.Generator().manual_seed(21)
    z = torch.randn(4, prior.unet.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([200, 400, 600, 800])
    text = torch.cat([sd.source_text, sd.target_text, sd.source_text, sd.target_text])
    control = sd.control_of(renders(21, b=4)[1], z)
    weights = torch.randn(z.shape, generator=g)
    for routes in ([BASE, BASE, SOURCE, TARGET], [SOURCE, TARGET], [TARGET], [TARGET, BASE, SOURCE]):
        n, rows = len(routes), sum(r != BASE for r in routes)
        out = sd.adapters.predict(z[:n], t[:n], text[:n], routes, control[:rows])
        grads = torch.autograd.grad((out * weights[:n]).sum(), sd.adapters.trainable, allow_unused=True)
        grads = [torch.zeros_like(p) if g_ is None else g_ for p, g_ in zip(sd.adapters.trainable, grads)]
        ours = {SOURCE: [], TARGET: []}
        if routing == "fused":  # per layer A^T [2, in, r], B^T [2, r, out] -> peft's per-adapter weights
            for a, b in zip(grads[0::2], grads[1::2]):
                for k, name in enumerate((SOURCE, TARGET)):
                    ours[name] += [a[k].t(), b[k].t()]
        else:
            half = len(grads) // 2
            ours = {SOURCE: grads[:half], TARGET: grads[half:]}
        ref, ref_grads = per_adapter_reference(sd, z[:n], t[:n], text[:n], control[:rows], routes, weights[:n])
        torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=2e-6, msg=lambda m: f"{routes}: {m}")
        for name in (SOURCE, TARGET):
            mine = torch.cat([x.flatten() for x in ours[name]])
            theirs = torch.cat([x.flatten() for x in ref_grads[name]])
            if name not in routes:
                assert not mine.any(), (routes, name)
                continue
            assert theirs.norm() > 0  # not a comparison of zeros
            assert (mine - theirs).norm() / theirs.norm() < 1e-5, (routes, name)
