"""`ns-train piva` on a toy scene: discovery, a real nerfacto run, editing, checkpoints, resume, bad input."""

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nerfstudio")

from piva.nerfstudio import runs  # noqa: E402
from piva.noe.prepare import toy_object_scene  # noqa: E402
from piva.toyworld.scenes import Scene, write_blender_dataset  # noqa: E402

SIZE = runs.RunSize(edit_steps=1, source_steps=20, source_rays_per_batch=256, render_short_side=32,
                    rays_per_batch=128, cpu_field=True, device="cpu")

NS_TRAIN = str(Path(sys.executable).parent / "ns-train")
pytestmark = pytest.mark.slow


def test_nerfstudio_discovers_the_methods():
    from nerfstudio.configs.method_configs import all_descriptions
    from nerfstudio.plugins.registry import discover_methods

    methods, _ = discover_methods()
    assert {"piva", "piva-object", "piva-dds", "piva-sds", "piva-small"} <= set(methods)
    assert "piva" in all_descriptions
    assert methods["piva"].pipeline.guidance.identity_weight == 0.2  # paper: real scenes
    assert methods["piva-object"].pipeline.guidance.identity_weight == 0.4  # paper: objects
    assert methods["piva-dds"].pipeline.guidance.mode == "dds"
    assert methods["piva-sds"].pipeline.guidance.mode == "sds"


def test_guidance_knobs_are_ns_train_flags_with_help():
    """GuidanceConfig is nested in the pipeline config: each of its fields is a --pipeline.guidance.* flag."""
    import dataclasses

    from piva.guidance import GuidanceConfig

    res = subprocess.run([NS_TRAIN, "piva", "--help"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200"))
    assert res.returncode == 0, res.stderr[-2000:]
    for f in dataclasses.fields(GuidanceConfig):
        assert "--pipeline.guidance." + f.name.replace("_", "-") in res.stdout, f.name
    assert "lambda of eq. 9" in res.stdout  # tyro's help comes from the field docstrings
    assert "--pipeline.identity-weight" not in res.stdout  # declared once


def test_benchmark_and_demo_configs_differ_from_the_registered_method_in_sizes_and_inputs_only(tmp_path):
    from piva.nerfstudio.piva_config import METHODS

    scene = toy_object_scene(tmp_path / "data")
    for name in ("piva-object", "piva-dds", "piva-sds", "piva"):
        for size in (runs.TOY_SIZE, runs.RunSize(), runs.TOY_SIZE.with_edit_steps(40)):
            cfg = runs.edit_config(name, scene, tmp_path / "load", tmp_path / "out", "a red cube", "a blue cube", size,
                                   diffusion_model="m", controlnet_model="c")
            diff = set(runs.config_differences(METHODS[name].config, cfg))
            assert diff <= runs.SIZE_FIELDS | runs.INPUT_FIELDS, diff - runs.SIZE_FIELDS - runs.INPUT_FIELDS
            assert cfg.pipeline.guidance.anneal_step == size.anneal_step
    assert runs.TOY_SIZE.with_edit_steps(40).anneal_step == 20  # the anneal keeps its place in the run
    # The comparison can fail: a method knob set by a caller shows up.
    cfg.pipeline.guidance.identity_weight = 0.3
    assert "pipeline.guidance.identity_weight" in set(runs.config_differences(METHODS["piva"].config, cfg))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("ns")
    data = write_blender_dataset(Scene("cube", "red"), root / "data", n_train=12, n_val=2, size=32)
    other = write_blender_dataset(Scene("cube", "red"), root / "other", n_train=12, n_val=2, size=32, seed=7)
    ckpt = runs.reconstruct(toy_object_scene(data), root / "runs", SIZE) / "nerfstudio_models"
    return {"root": root, "data": data, "other": other, "nerfacto": ckpt}


def ns_train(scene, tiny_dir, *extra, load_dir=None, data=None, prompts=("a red cube", "a blue cube"), steps=2):
    args = [NS_TRAIN, "piva", "--output-dir", str(scene["root"] / "edits"), "--experiment-name", "edit",
            "--timestamp", "run", "--max-num-iterations", str(steps), "--steps-per-save", "1",
            "--machine.device-type", "cpu", "--vis", "tensorboard",
            "--pipeline.guidance.source-prompt", prompts[0], "--pipeline.guidance.target-prompt", prompts[1],
            "--pipeline.diffusion-model", str(tiny_dir), "--pipeline.controlnet-model", str(tiny_dir / "controlnet"),
            "--pipeline.render-short-side", "32", "--pipeline.datamanager.train-num-rays-per-batch", "128",
            *runs.cli_args(toy_object_scene(scene["data"]), SIZE), *extra]
    if load_dir is not None:
        args += ["--load-dir", str(load_dir)]
    args += ["blender-data", "--data", str(data or scene["data"]), "--alpha-color", "None"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def checkpoints(scene):
    d = scene["root"] / "edits" / "edit" / "piva" / "run" / "nerfstudio_models"
    return d, sorted(d.glob("step-*.ckpt"))


def test_edit_writes_adapters_and_resumes(scene, tiny_dir):
    shutil.rmtree(scene["root"] / "edits", ignore_errors=True)
    geometry = ("--pipeline.model.edit-geometry", "True")  # the whole field (colour-only prompts would keep it)
    res = ns_train(scene, tiny_dir, *geometry, load_dir=scene["nerfacto"], steps=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d, ckpts = checkpoints(scene)
    assert len(ckpts) == 1  # only the latest is kept
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    pipe = state["pipeline"]
    assert set(pipe["piva.adapters"]["weights"]) == {"source", "target"}
    assert pipe["piva.adapters"]["optimizer"]["state"]  # the adapters' AdamW has moved
    assert pipe["piva.original_rgb"].shape == (12, 32, 32, 3)
    nerfacto_step = torch.load(next(scene["nerfacto"].glob("*.ckpt")), weights_only=False)["step"]
    first = state["step"]
    assert first == nerfacto_step + 2
    assert not list(d.parent.glob(".*tmp"))  # no temporary file left behind
    assert len(list((scene["nerfacto"].parent / "piva_original_renders").glob("*.pt"))) == 1  # kept for the next edit

    res = ns_train(scene, tiny_dir, *geometry, load_dir=d, steps=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming the edit" in res.stdout
    _, ckpts = checkpoints(scene)
    resumed = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    assert resumed["step"] == first + 2
    assert resumed["pipeline"]["piva.meta"]["edit_start_step"] == pipe["piva.meta"]["edit_start_step"]
    assert torch.equal(resumed["pipeline"]["piva.original_rgb"], pipe["piva.original_rgb"])
    # Inside the growth phase the captured colour head travels with the checkpoint, unchanged by the resume.
    assert all(torch.equal(x, y) for x, y in zip(resumed["pipeline"]["piva.captured_colour"], pipe["piva.captured_colour"]))
    # The field changed during the edit.
    key = next(k for k in pipe if "field.mlp_base" in k)
    assert not torch.equal(resumed["pipeline"][key], pipe[key])

    # The same checkpoint on another scene's data: one clear line.
    res = ns_train(scene, tiny_dir, *geometry, load_dir=d, data=scene["other"], steps=1)
    assert res.returncode != 0
    assert "piva: error: this piva checkpoint was made on another scene" in res.stderr


def test_target_only_steps_step_each_group_at_its_scaled_lr(scene, tiny_dir):
    """Adam's first step moves each parameter by exactly its lr: the grid at 10x its 1e-3 during a target-only
    step, the colour MLP at the scale given for its group, the plain lr once the steps are over."""
    nerfacto = torch.load(next(scene["nerfacto"].glob("*.ckpt")), map_location="cpu", weights_only=False)["pipeline"]
    grid = next(k for k in nerfacto if k.endswith("field.mlp_base.model.0.hash_table") and "proposal" not in k)
    mlp = next(k for k in nerfacto if ".field.mlp_head." in k and "proposal" not in k)
    for target_only, mlp_scale, expected in (("1", "2", (1e-2, 2e-3)), ("0", "2", (1e-3, 1e-3))):
        shutil.rmtree(scene["root"] / "edits", ignore_errors=True)
        res = ns_train(scene, tiny_dir, "--pipeline.guidance.target-only-steps", target_only,
                       "--target-only-lr-scales.field-mlps", mlp_scale, load_dir=scene["nerfacto"], steps=1,
                       prompts=("a red cube", "a red cube on a white plate"))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        state = torch.load(checkpoints(scene)[1][-1], map_location="cpu", weights_only=False)
        moved = [(state["pipeline"][k] - nerfacto[k]).abs().max().item() for k in (grid, mlp)]
        assert moved == pytest.approx(list(expected), rel=1e-3), (target_only, moved)
        assert state["optimizers"]["fields"]["param_groups"][0]["lr"] == 1e-3  # the plain lr is what is saved


def test_colour_head_is_reset_when_the_growth_phase_ends(scene, tiny_dir):
    """One target-only step at 10x, then one plain step: with the reset the colour MLP ends within one
    plain Adam step of the captured one while the grid keeps its 10x move; without it the MLP keeps both steps."""
    nerfacto = torch.load(next(scene["nerfacto"].glob("*.ckpt")), map_location="cpu", weights_only=False)["pipeline"]
    grid = next(k for k in nerfacto if k.endswith("field.mlp_base.model.0.hash_table") and "proposal" not in k)
    head = [k for k in nerfacto if ".field.mlp_head." in k and "proposal" not in k]
    moved = {}
    for reset in ("True", "False"):
        shutil.rmtree(scene["root"] / "edits", ignore_errors=True)
        res = ns_train(scene, tiny_dir, "--pipeline.guidance.target-only-steps", "1", "--target-only-lr-scales.field-mlps",
                       "10", "--pipeline.reset-colour-after-growth", reset, load_dir=scene["nerfacto"], steps=2,
                       prompts=("a red cube", "a red cube on a white plate"))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert ("colour head reset" in res.stdout) == (reset == "True")
        state = torch.load(checkpoints(scene)[1][-1], map_location="cpu", weights_only=False)["pipeline"]
        moved[reset] = [(state[k] - nerfacto[k]).abs().max().item() for k in (grid, *head)]
    assert moved["True"][0] > 9e-3 and moved["False"][0] > 9e-3  # the grown geometry stays
    assert max(moved["True"][1:]) < 2.5e-3  # one plain step (Adam moves at most ~lr per step)...
    assert max(moved["False"][1:]) > 9e-3  # ...against the 10x step kept


def test_missing_load_dir_fails_in_one_line(scene, tiny_dir):
    res = ns_train(scene, tiny_dir, steps=1)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("piva: error:") and "--load-dir" in last


def test_empty_prompt_fails_in_one_line(scene, tiny_dir):
    res = ns_train(scene, tiny_dir, load_dir=scene["nerfacto"], prompts=("a red cube", ""), steps=1)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("piva: error: the target prompt is empty")


def test_two_pass_render_gradient_equals_one_full_graph(scene, tiny_dir):
    """The chunked two-pass backward gives the field the same gradient as autograd through one whole render."""
    cfg = runs.edit_config("piva-object", toy_object_scene(scene["data"]), scene["nerfacto"], scene["root"] / "unused",
                           "a red cube", "a red sphere", SIZE, str(tiny_dir), str(tiny_dir / "controlnet"))
    pipeline = cfg.pipeline.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)
    ckpt = next(scene["nerfacto"].glob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    pipeline.load_pipeline(state["pipeline"], state["step"])
    pipeline.model.eval()  # deterministic sampling, so any chunking renders the same image
    pipeline.config.rays_per_chunk = 100
    cam = pipeline._camera(3)
    image = pipeline._render(cam)["rgb"]
    g = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    params = [p for p in pipeline.model.parameters() if p.requires_grad]

    pipeline.model.zero_grad()
    pipeline._render(cam, grad_rgb=g)
    two_pass = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    pipeline.model.zero_grad()
    bundle = cam[0].generate_rays(camera_indices=0, keep_shape=True)
    bundle.camera_indices = torch.full_like(bundle.camera_indices, 3)
    full = pipeline.model(bundle.flatten())["rgb"]
    torch.testing.assert_close(full.detach().reshape(image.shape), image, rtol=1e-5, atol=1e-6)
    (full * g.reshape(-1, 3)).sum().backward()
    one_graph = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    assert any(t.abs().sum() > 0 for t in one_graph)
    for a, b in zip(two_pass, one_graph):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _loaded_edit_pipeline(scene, tiny_dir, views_per_step: int):
    cfg = runs.edit_config("piva-object", toy_object_scene(scene["data"]), scene["nerfacto"], scene["root"] / "unused",
                           "a red cube", "a red sphere", SIZE, str(tiny_dir), str(tiny_dir / "controlnet"))
    cfg.pipeline.views_per_step = views_per_step
    pipeline = cfg.pipeline.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)
    state = torch.load(next(scene["nerfacto"].glob("*.ckpt")), map_location="cpu", weights_only=False)
    pipeline.load_pipeline(state["pipeline"], state["step"])
    pipeline._setup_guidance()
    pipeline._cache_original_renders()
    return cfg, pipeline, state["step"]


def test_views_per_step_scores_several_views_in_one_batch(scene, tiny_dir):
    """views_per_step=3: one score call on a batch of 3 views, each view's pixels get their own gradient;
    rendered once each while the three fit in one chunk, in two passes (no grad, then grad) when they do not."""
    cfg, pipeline, step0 = _loaded_edit_pipeline(scene, tiny_dir, 3)
    seen, rendered = [], []
    step, render = pipeline.guidance.step, pipeline._render

    def spy_step(x, **kw):
        seen.append(tuple(x.shape))
        return step(x, **kw)

    def spy_render(cam, grad_rgb=None, seed=0, keep_graph=False):
        out = render(cam, grad_rgb=grad_rgb, seed=seed, keep_graph=keep_graph)
        rendered.append((cam[1], "grad" if grad_rgb is not None else "graph" if "rgb_graph" in out else "no grad"))
        return out

    pipeline.guidance.step, pipeline._render = spy_step, spy_render
    grid = pipeline.model.field.mlp_base.model[0].hash_table
    for chunk, passes in ((3 * 32 * 32, ["graph"]), (3 * 32 * 32 - 1, ["no grad", "grad"])):
        pipeline.config.rays_per_chunk = chunk
        seen.clear()
        rendered.clear()
        pipeline.model.zero_grad()
        pipeline.get_train_loss_dict(step0 + 1)
        assert seen == [(3, 3, 32, 32)]
        views = [[i for i, kind in rendered if kind == p] for p in passes]
        assert all(len(v) == 3 for v in views) and all(v == views[0] for v in views) and len(rendered) == 3 * len(passes)
        assert grid.grad is not None and grid.grad.abs().sum() > 0
    cfg.pipeline.views_per_step = 0
    with pytest.raises(ValueError, match="views_per_step"):
        cfg.pipeline.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)


def test_one_pass_render_gives_the_two_pass_gradient_in_an_edit_step(scene, tiny_dir):
    """An edit step (training mode: jittered samples) with each view's graph kept gives the field the same gradient
    as the memory-bounded two passes, from the same adapters and noise."""
    _, pipeline, step0 = _loaded_edit_pipeline(scene, tiny_dir, 2)
    adapters = copy.deepcopy(pipeline.guidance.adapters.state())
    params = [p for p in pipeline.model.parameters() if p.requires_grad]
    grads = []
    for chunk in (2 * 32 * 32, 32 * 32):  # both views in one chunk: one pass; one view a chunk: two passes
        pipeline.config.rays_per_chunk = chunk
        pipeline.guidance.adapters.load_state(copy.deepcopy(adapters))
        pipeline.model.zero_grad()
        pipeline.get_train_loss_dict(step0 + 5)
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for one_pass, two_pass in zip(*grads):
        torch.testing.assert_close(one_pass, two_pass, rtol=1e-4, atol=1e-7)


def test_original_renders_are_kept_beside_the_source_run_for_the_next_edit(scene, tiny_dir, tmp_path):
    """A second edit of the same scene (another caption, another edit type) loads the first edit's renders of the
    original scene instead of rendering again; what it loads equals a fresh render; another render size, or a
    changed checkpoint, is another file."""
    models = tmp_path / "source" / "nerfstudio_models"
    shutil.copytree(scene["nerfacto"], models)
    ckpt = next(models.glob("*.ckpt"))

    def pipeline_for(target: str, keep: bool = True):
        cfg = runs.edit_config("piva-object", toy_object_scene(scene["data"]), models, tmp_path / "unused",
                               "a red cube", target, SIZE, str(tiny_dir), str(tiny_dir / "controlnet"))
        cfg.pipeline.cache_original_renders = keep
        pipeline = cfg.pipeline.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        pipeline.load_pipeline(state["pipeline"], state["step"])
        pipeline.source_checkpoint = ckpt
        return pipeline

    first = pipeline_for("a red sphere")  # a shape edit: edit_geometry True
    first._cache_original_renders()
    kept = first.original_renders_file()
    assert kept.parent == tmp_path / "source" / "piva_original_renders" and kept.is_file()

    second = pipeline_for("a blue cube")  # a colour edit: edit_geometry False, a train-only difference
    assert second.original_renders_file() == kept

    def no_render(*args, **kwargs):
        raise AssertionError("the second edit rendered the original scene again")

    second._render = no_render
    second._cache_original_renders()
    fresh = pipeline_for("a blue cube", keep=False)
    assert fresh.original_renders_file() is None
    fresh._cache_original_renders()
    assert torch.equal(second.original_rgb, fresh.original_rgb) and torch.equal(second.original_depth, fresh.original_depth)
    assert len(list(kept.parent.iterdir())) == 1  # nothing else written, no temporary left

    fresh.config.render_short_side = 16
    assert fresh.original_renders_file() is None  # off stays off
    second.config.render_short_side = 16
    assert second.original_renders_file() not in (None, kept)
    second.config.render_short_side = first.config.render_short_side
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))  # the source run trained on
    assert second.original_renders_file() != kept


def test_the_run_seed_sets_the_edit_draws(scene, tiny_dir, tmp_path):
    """--machine.seed reaches the edit's view, timestep and noise draws (a benchmark seed must be another run, not
    the same draws again): one seed draws the same views and timesteps twice, another seed other ones."""
    from piva.nerfstudio.piva_trainer import PivaTrainer

    for explicit, expected in ((None, 5), (3, 3)):
        cfg = runs.edit_config("piva-object", toy_object_scene(scene["data"]), scene["nerfacto"], tmp_path,
                               "a red cube", "a red sphere", SIZE, str(tiny_dir), str(tiny_dir / "controlnet"))
        cfg.machine.seed, cfg.pipeline.seed = 5, explicit
        PivaTrainer(cfg)
        assert cfg.pipeline.seed == expected
    _, pipeline, step0 = _loaded_edit_pipeline(scene, tiny_dir, 2)
    score = pipeline.guidance.step
    timesteps = []

    def spy(x, **kw):
        out = score(x, **kw)
        timesteps.append(out.t)
        return out

    pipeline.guidance.step = spy
    draws = []
    for seed in (0, 1, 0):
        pipeline.config.seed = seed
        timesteps.clear()
        views = []
        for k in range(3):
            pipeline.get_train_loss_dict(step0 + 1 + k)
            views.append(pipeline.last_diagnostics["camera"])
        draws.append((views, list(timesteps)))
    assert draws[0] == draws[2] and draws[0] != draws[1], draws


def test_field_mlps_get_their_own_optimizer_group():
    """separate_mlp_group: hash grids stay in `fields`, every field MLP weight goes to `field_mlps`, none lost."""
    import torch
    from nerfstudio.data.scene_box import SceneBox

    from piva.nerfstudio.piva_model import PivaNerfactoModelConfig
    from piva.nerfstudio.runs import CPU_FIELD

    box = SceneBox(aabb=torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]]))
    for split in (False, True):
        cfg = PivaNerfactoModelConfig(**CPU_FIELD, separate_mlp_group=split)
        model = cfg.setup(scene_box=box, num_train_data=4)
        groups = model.get_param_groups()
        field_params = dict(model.field.named_parameters())
        grouped = [id(p) for k in ("fields", "field_mlps") for p in groups.get(k, [])]
        assert sorted(grouped) == sorted(id(p) for p in field_params.values())  # each exactly once
        if split:
            names = {id(p): n for n, p in field_params.items()}
            assert {names[id(p)] for p in groups["fields"]} == {"mlp_base.model.0.hash_table"}
            assert any(names[id(p)].startswith("mlp_head.") for p in groups["field_mlps"])
        else:
            assert "field_mlps" not in groups


def test_edit_grid_levels_leaves_the_fine_levels_as_reconstructed():
    """Levels >= edit_grid_levels get no gradient (Adam leaves them bit-identical); the coarse ones move."""
    import torch
    from nerfstudio.data.scene_box import SceneBox

    from piva.nerfstudio.piva_model import PivaNerfactoModelConfig
    from piva.nerfstudio.runs import CPU_FIELD

    box = SceneBox(aabb=torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]]))
    model = PivaNerfactoModelConfig(**CPU_FIELD, edit_grid_levels=3).setup(scene_box=box, num_train_data=4)
    table = model.field.mlp_base.model[0].hash_table
    rows = table.shape[0] // CPU_FIELD["num_levels"]
    before = table.detach().clone()
    opt = torch.optim.Adam([table], lr=0.1)
    points = torch.rand(4096, 3) * 2 - 1
    for _ in range(3):
        opt.zero_grad()
        model.field.mlp_base(points).square().sum().backward()
        opt.step()
    moved = (table.detach() != before).any(1)
    assert moved[: 3 * rows].any() and not moved[3 * rows :].any()
    # coarse to fine: from edit step `edit_grid_levels_until` on, every level moves
    model = PivaNerfactoModelConfig(**CPU_FIELD, edit_grid_levels=3, edit_grid_levels_until=5).setup(
        scene_box=box, num_train_data=4)
    table = model.field.mlp_base.model[0].hash_table
    for edit_step, fine_moves in ((4, False), (5, True)):
        model.edit_step = edit_step
        table.grad = None
        model.field.mlp_base(points).square().sum().backward()
        assert bool(table.grad[3 * rows :].abs().sum() > 0) is fine_moves
    with pytest.raises(ValueError, match="must be 1..8"):
        PivaNerfactoModelConfig(**CPU_FIELD, edit_grid_levels=9).setup(scene_box=box, num_train_data=4)


def test_geometry_only_growth_keeps_the_colour_gradient_out_of_the_grid():
    """geometry_only_growth during growth steps: the grid's gradient is the one with the colour head's input
    detached by hand (density only), unlike a plain step's; the colour head's own gradient is the same."""
    import torch
    from nerfstudio.cameras.rays import RayBundle
    from nerfstudio.data.scene_box import SceneBox

    from piva.nerfstudio.piva_model import PivaNerfactoModelConfig
    from piva.nerfstudio.runs import CPU_FIELD

    box = SceneBox(aabb=torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]]))
    model = PivaNerfactoModelConfig(**CPU_FIELD, geometry_only_growth=True).setup(scene_box=box, num_train_data=4)
    model.eval()
    n = 64
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(0)) * 0.2
                                         + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    bundle = RayBundle(origins=torch.tensor([[0.0, 0.0, 3.0]]).repeat(n, 1), directions=dirs,
                       pixel_area=torch.full((n, 1), 1e-4), camera_indices=torch.zeros(n, 1, dtype=torch.long),
                       nears=torch.full((n, 1), 1.0), fars=torch.full((n, 1), 5.0))
    table = model.field.mlp_base.model[0].hash_table
    head = list(model.field.mlp_head.parameters())

    def grads(growing: bool, detach_by_hand: bool = False):
        model.growing = growing
        model.zero_grad()
        forward = model.field.mlp_head.forward
        if detach_by_hand:
            model.field.mlp_head.forward = lambda x: forward(x.detach())
        torch.manual_seed(0)
        (model.get_outputs(bundle)["rgb"] * torch.tensor([0.3, -1.0, 2.0])).sum().backward()
        model.field.mlp_head.forward = forward
        return table.grad.clone(), [p.grad.clone() for p in head]

    grid_growing, head_growing = grads(True)
    model.config.geometry_only_growth = False
    grid_by_hand, _ = grads(False, detach_by_hand=True)
    grid_plain, head_plain = grads(False)
    assert grid_growing.abs().sum() > 0  # the density still moves the grid
    torch.testing.assert_close(grid_growing, grid_by_hand)
    assert (grid_growing - grid_plain).abs().max() > 1e-3 * grid_plain.abs().max()
    for a, b in zip(head_growing, head_plain):
        torch.testing.assert_close(a, b)


def test_geometry_edits_change_only_the_levels_whose_table_holds_every_vertex():
    """The default rule: a geometry edit trains the levels with (res+1)^3 <= table size, counted here by hand;
    a reconstruction (edit_geometry unresolved) and a tcnn grid train all."""
    import math

    import torch
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.field_components.encodings import HashEncoding

    from piva.nerfstudio.piva_model import PivaNerfactoModelConfig, whole_levels
    from piva.nerfstudio.runs import CPU_FIELD

    def by_hand(levels, min_res, max_res, log2):
        growth = math.exp((math.log(max_res) - math.log(min_res)) / (levels - 1))
        return sum((math.floor(min_res * growth**i) + 1) ** 3 <= 2**log2 for i in range(levels))

    assert by_hand(8, 16, 256, 15) == 2 and by_hand(16, 16, 2048, 19) == 5  # the toy field; nerfacto on a GPU
    assert whole_levels(HashEncoding(num_levels=8, max_res=256, log2_hashmap_size=15, implementation="torch")) == 2
    assert whole_levels(HashEncoding(num_levels=16, max_res=2048, log2_hashmap_size=19, implementation="torch")) == 5

    box = SceneBox(aabb=torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]]))
    points = torch.rand(4096, 3) * 2 - 1
    rows = 2**15
    for edit_geometry, frozen_from in ((True, 2 * rows), (None, None), (False, None)):
        model = PivaNerfactoModelConfig(**CPU_FIELD, edit_geometry=edit_geometry).setup(scene_box=box, num_train_data=4)
        table = model.field.mlp_base.model[0].hash_table
        model.field.mlp_base(points).square().sum().backward()
        fine = table.grad[2 * rows :].abs().sum()
        assert bool(fine == 0) is (frozen_from is not None), edit_geometry
        assert table.grad[: 2 * rows].abs().sum() > 0


def test_geometry_edits_grow_with_the_target_caption_first(scene, tiny_dir):
    """The pipeline's rule: target-only steps until the anneal for a geometry edit, none for a colour-only one."""
    from piva.nerfstudio.piva_pipeline import PivaPipeline

    for target, expected in (("a blue cube", 0), ("a red cube on a white plate", 150)):
        cfg = runs.edit_config("piva-object", toy_object_scene(scene["data"]), scene["nerfacto"], scene["root"],
                               "a red cube", target, runs.TOY_SIZE, diffusion_model=str(tiny_dir))
        pipeline = PivaPipeline(cfg.pipeline, "cpu")
        assert pipeline.config.guidance.target_only_steps == expected
        assert pipeline.model.config.edit_geometry is (expected > 0)


def test_backdrop_is_a_fixed_colour_the_field_cannot_change():
    """Empty rays show exactly the backdrop, and a loss on them sends no gradient into the field."""
    from nerfstudio.cameras.rays import RayBundle
    from nerfstudio.data.scene_box import SceneBox

    from piva.nerfstudio.piva_model import PivaNerfactoModelConfig

    box = SceneBox(aabb=torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]]))
    settings = toy_object_scene(Path("unused")).model_settings(SIZE)
    assert settings["backdrop_rgb"] == (0.92, 0.92, 0.92)
    settings["average_init_density"] = 1e-6  # an empty scene: almost no density anywhere
    model = PivaNerfactoModelConfig(**settings).setup(scene_box=box, num_train_data=4)
    n = 16
    rays = RayBundle(origins=torch.tensor([[0.0, 0.0, 3.6]]).repeat(n, 1), directions=torch.nn.functional.normalize(
        torch.randn(n, 3) * 0.05 + torch.tensor([0.0, 0.0, -1.0]), dim=-1), pixel_area=torch.ones(n, 1),
        camera_indices=torch.zeros(n, 1, dtype=torch.long), nears=torch.full((n, 1), 1.5), fars=torch.full((n, 1), 6.0))
    out = model(rays)
    assert out["accumulation"].max() < 1e-3
    assert torch.allclose(out["rgb"], torch.full_like(out["rgb"], 0.92), atol=1e-3)
    out["rgb"].sum().backward()
    head = [p.grad for p in model.field.mlp_head.parameters() if p.grad is not None]
    assert all(g.abs().max() < 1e-3 for g in head)


def test_appearance_only_edit_keeps_the_density(scene, tiny_dir):
    """A colour-only edit (the method's rule; --pipeline.model.edit-geometry False forces it): every density
    weight (grid, density MLP, proposal networks) is bit-identical to the nerfacto checkpoint after the edit,
    while the colour head has moved."""
    out = scene["root"] / "appearance"
    res = ns_train(scene, tiny_dir, "--output-dir", str(out), load_dir=scene["nerfacto"], steps=3)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    before = torch.load(next(scene["nerfacto"].glob("*.ckpt")), map_location="cpu", weights_only=False)["pipeline"]
    after = torch.load(next((out / "edit" / "piva" / "run" / "nerfstudio_models").glob("*.ckpt")),
                       map_location="cpu", weights_only=False)["pipeline"]
    density = [k for k in before if k.startswith(("_model.field.mlp_base.", "_model.proposal_networks."))]
    colour = [k for k in before if k.startswith("_model.field.mlp_head.")]
    assert density and colour
    for k in density:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in colour)

    # Resuming it with the whole field trainable would need optimizer groups it never had: one clear line.
    res = ns_train(scene, tiny_dir, "--output-dir", str(out), "--pipeline.model.edit-geometry", "True",
                   load_dir=out / "edit" / "piva" / "run" / "nerfstudio_models", steps=1)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("piva: error: this piva checkpoint used edit_geometry=False")
