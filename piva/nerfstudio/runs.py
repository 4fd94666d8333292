"""Runs made from the registered methods: reconstruct a source scene, edit it, resume, find checkpoints.

`ns-train piva ...` builds its config from flags; the demo and the benchmark build theirs
here, from the same registered `MethodSpecification`s (piva_config.METHODS). They choose
sizes (`RunSize`) and inputs (data, prompts, model folders), never the method: a test
holds every difference to the fields listed in SIZE_FIELDS and INPUT_FIELDS.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple, Union

import torch

def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The highest-step `step-*.ckpt` in a nerfstudio_models folder (the one place piva looks), or None."""
    steps = sorted(int(p.stem.split("-")[1]) for p in Path(directory).glob("step-*.ckpt"))
    return Path(directory) / f"step-{steps[-1]:09d}.ckpt" if steps else None


# nerfacto at the size that reconstructs a toy object in minutes on 2 CPU cores (~0.15 s/iter
# with the torch hash grid, measured); the appearance embedding is off because the toy views
# share one exposure.
CPU_FIELD = dict(
    num_levels=8,
    log2_hashmap_size=15,
    max_res=256,
    hidden_dim=32,
    hidden_dim_color=32,
    num_proposal_samples_per_ray=(64, 32),
    num_nerf_samples_per_ray=32,
    proposal_warmup=200,
    proposal_weights_anneal_max_num_iters=200,
    implementation="torch",
    use_appearance_embedding=False,
)

# Gaussian splats on CPU (piva's own rasteriser): few Gaussians, no view-dependent colour, densification
# on the short schedule of a 600-step fit. Sizes only; the method's own values stay.
CPU_SPLATS = dict(
    num_random=2000,
    random_scale=2.0,
    sh_degree=0,
    num_downscales=0,
    warmup_length=100,
    refine_every=50,
)


@dataclass(frozen=True)
class RunSize:
    """What a caller may choose for a registered method: sizes (how long, how large, where), not the method."""

    edit_steps: int = 15000
    """Edit steps in all (a resumed edit runs what is left)."""
    anneal_step: Optional[int] = 2000
    """Edit step at which the timestep range anneals: a step count, so it scales with `edit_steps`."""
    render_short_side: int = 512
    """Short side of the views the diffusion model sees."""
    rays_per_batch: int = 4096
    """The field's own ray batch during the edit (proposal-network losses)."""
    rays_per_chunk: int = 1 << 14
    """Rays rendered and backpropagated at once."""
    source_steps: int = 30000
    """nerfacto steps for the source scene."""
    source_rays_per_batch: int = 4096
    """nerfacto's ray batch for the source scene."""
    cpu_field: bool = False
    """The CPU-size nerfacto (CPU_FIELD) for both the source scene and its edit."""
    device: str = "cuda"
    """cpu, cuda, mps."""

    def with_edit_steps(self, edit_steps: Optional[int]) -> "RunSize":
        """The same size with another edit length; the anneal step keeps its place in the run."""
        if edit_steps is None or edit_steps == self.edit_steps:
            return self
        anneal = None if self.anneal_step is None else round(self.anneal_step * edit_steps / self.edit_steps)
        return dataclasses.replace(self, edit_steps=edit_steps, anneal_step=anneal)


# The toy world on 2 CPU cores (piva demo; benchmark --preset toy runs it at 450 edit steps): 32 px views, 300 edit steps.
TOY_SIZE = RunSize(edit_steps=300, anneal_step=150, render_short_side=32, rays_per_batch=256,
                   source_steps=600, source_rays_per_batch=1024, cpu_field=True, device="cpu")

# Config fields a RunSize sets, and fields that hold the run's inputs and bookkeeping. An edit
# built here differs from the registered method in these fields only (tests/test_nerfstudio.py).
SIZE_FIELDS = frozenset({
    "max_num_iterations", "pipeline.guidance.anneal_step", "pipeline.render_short_side",
    "pipeline.datamanager.train_num_rays_per_batch", "pipeline.rays_per_chunk", "machine.device_type",
    *(f"pipeline.model.{k}" for k in CPU_FIELD), *(f"pipeline.model.{k}" for k in CPU_SPLATS),
})
INPUT_FIELDS = frozenset({
    "pipeline.guidance.source_prompt", "pipeline.guidance.target_prompt", "pipeline.diffusion_model",
    "pipeline.controlnet_model", "pipeline.datamanager.dataparser", "pipeline.model.backdrop_rgb",
    "pipeline.model.near_plane", "pipeline.model.far_plane", "pipeline.model.edit_geometry",
    "output_dir", "experiment_name", "timestamp", "load_dir", "vis", "steps_per_save", "steps_per_eval_batch",
    "steps_per_eval_image", "steps_per_eval_all_images", "machine.num_devices",
})


@dataclass(frozen=True)
class ObjectScene:
    """An object captured on a known backdrop: its Blender-layout dataset and the depth range of its cameras."""

    data: Path
    backdrop: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Fixed colour behind the object (PivaNerfactoModelConfig.backdrop_rgb)."""
    near: float = 0.5
    far: float = 8.0
    rgba: bool = True
    """RGBA images (composited on white, nerfstudio's Blender default) or RGB on the backdrop."""

    def parser(self):
        from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

        return BlenderDataParserConfig(data=Path(self.data), alpha_color="white" if self.rgba else None)

    def model_settings(self, size: RunSize) -> dict:
        return dict(CPU_FIELD if size.cpu_field else {}, backdrop_rgb=self.backdrop, near_plane=self.near,
                    far_plane=self.far)


COLMAP_MODELS = ("colmap/sparse/0", "sparse/0", "sparse")
"""Where a COLMAP folder keeps its model (cameras, images), relative to the capture: nerfstudio's layout first."""


def colmap_model(folder: Path) -> Optional[Path]:
    """The COLMAP model folder of a capture without transforms.json, or None."""
    for sub in COLMAP_MODELS:
        if any((Path(folder) / sub / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
            return Path(sub)
    return None


@dataclass(frozen=True)
class CaptureScene:
    """A captured scene as `ns-process-data` leaves it (transforms.json + images), or a COLMAP folder (images/ and
    a sparse model): nerfstudio's own parsers, with their orientation, centring and scale, and nerfacto's
    unbounded background and depth range."""

    data: Path
    downscale: int = 1
    """Images read from `images_<downscale>/` (piva.noe.prepare makes them when missing)."""
    eval_every: int = 8
    """Held out: every Nth frame, unless transforms.json lists its own `test_filenames`/`val_filenames`."""
    backdrop = None  # no fixed colour behind a captured scene

    def parser(self):
        split = dict(downscale_factor=self.downscale, eval_mode="interval", eval_interval=self.eval_every)
        model = None if (Path(self.data) / "transforms.json").is_file() else colmap_model(Path(self.data))
        if model is not None:
            from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

            # SfM points are for splats; nerfacto does not read them.
            return ColmapDataParserConfig(data=Path(self.data), colmap_path=model, load_3D_points=False, **split)
        from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

        return NerfstudioDataParserConfig(data=Path(self.data), **split)

    def model_settings(self, size: RunSize) -> dict:
        return dict(CPU_FIELD) if size.cpu_field else {}


def _splats(model_config) -> bool:
    from piva.nerfstudio.splat_model import PivaSplatfactoModelConfig

    return isinstance(model_config, PivaSplatfactoModelConfig)


def _machine(size: RunSize):
    from nerfstudio.configs.base_config import MachineConfig

    return MachineConfig(device_type=size.device, num_devices=1)


def source_config(scene: Union[ObjectScene, CaptureScene], output_dir: Path, size: RunSize = RunSize()):
    """nerfacto (offline-safe model class, same weights layout) on an object dataset: what `ns-train
    nerfacto` writes, with the learning rates decaying over the run's own length."""
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
    from nerfstudio.engine.optimizers import AdamOptimizerConfig
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig

    from piva.nerfstudio.piva_model import PivaNerfactoModelConfig

    steps = size.source_steps

    def group():
        return {"optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=steps)}

    return TrainerConfig(
        method_name="nerfacto", experiment_name="source", timestamp="run", output_dir=Path(output_dir),
        max_num_iterations=steps, steps_per_save=steps, steps_per_eval_batch=1_000_000,
        steps_per_eval_image=1_000_000, steps_per_eval_all_images=1_000_000, save_only_latest_checkpoint=True,
        mixed_precision=False, machine=_machine(size),
        pipeline=VanillaPipelineConfig(
            datamanager=VanillaDataManagerConfig(dataparser=scene.parser(),
                                                 train_num_rays_per_batch=size.source_rays_per_batch),
            # Synthetic captures have exact poses; a real capture's stay as COLMAP made them, because the edit
            # (camera optimiser off, like every registered method) must see the cameras the source was fitted with.
            model=PivaNerfactoModelConfig(average_init_density=0.01, **scene.model_settings(size),
                                          camera_optimizer=CameraOptimizerConfig(mode="off")),
        ),
        optimizers={"proposal_networks": group(), "fields": group()},
        vis="tensorboard",
    )


def splat_source_config(scene: ObjectScene, output_dir: Path, size: RunSize = RunSize()):
    """splatfacto (piva's class: also runs on CPU) on an object dataset, with splatfacto's optimiser settings
    and random initial Gaussians (object datasets have no SfM points)."""
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
    from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig

    from piva.nerfstudio.piva_config import splat_optimizers
    from piva.nerfstudio.splat_model import PivaSplatfactoModelConfig

    steps = size.source_steps
    return TrainerConfig(
        method_name="splatfacto", experiment_name="source", timestamp="run", output_dir=Path(output_dir),
        max_num_iterations=steps, steps_per_save=steps, steps_per_eval_batch=1_000_000,
        steps_per_eval_image=1_000_000, steps_per_eval_all_images=1_000_000, save_only_latest_checkpoint=True,
        mixed_precision=False, machine=_machine(size),
        pipeline=VanillaPipelineConfig(
            datamanager=FullImageDatamanagerConfig(dataparser=scene.parser(), cache_images_type="uint8"),
            model=PivaSplatfactoModelConfig(random_init=True, backdrop_rgb=scene.backdrop,
                                            camera_optimizer=CameraOptimizerConfig(mode="off"),
                                            **(CPU_SPLATS if size.cpu_field else {})),
        ),
        optimizers=splat_optimizers(steps),
        vis="tensorboard",
    )


def edit_config(
    method: str,
    scene: Union[ObjectScene, CaptureScene],
    load_dir: Path,
    output_dir: Path,
    source_prompt: str,
    target_prompt: str,
    size: RunSize = RunSize(),
    diffusion_model: Optional[str] = None,
    controlnet_model: Optional[str] = None,
    edit_geometry: Optional[bool] = None,
    guidance: Optional[dict] = None,
):
    """The registered method `method` (piva_config.METHODS) with this run's inputs and sizes.

    `edit_geometry` None keeps the method's rule (geometry kept for colour-only prompts); `guidance`: GuidanceConfig
    fields to change (a sweep), nothing else."""
    from piva.nerfstudio.piva_config import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    cfg = copy.deepcopy(METHODS[method].config)
    pipe = cfg.pipeline
    pipe.guidance = dataclasses.replace(pipe.guidance, source_prompt=source_prompt, target_prompt=target_prompt,
                                        **{"anneal_step": size.anneal_step, **(guidance or {})})
    if diffusion_model is not None:
        pipe.diffusion_model = str(diffusion_model)
    if controlnet_model is not None:
        pipe.controlnet_model = str(controlnet_model)
    pipe.render_short_side = size.render_short_side
    pipe.rays_per_chunk = size.rays_per_chunk
    if _splats(pipe.model):  # whole views: no ray batches, no near/far planes
        pipe.datamanager = dataclasses.replace(pipe.datamanager, dataparser=scene.parser())
        pipe.model = dataclasses.replace(pipe.model, backdrop_rgb=scene.backdrop, edit_geometry=edit_geometry,
                                         **(CPU_SPLATS if size.cpu_field else {}))
    else:
        pipe.datamanager = dataclasses.replace(pipe.datamanager, dataparser=scene.parser(),
                                               train_num_rays_per_batch=size.rays_per_batch)
        pipe.model = dataclasses.replace(pipe.model, **scene.model_settings(size), edit_geometry=edit_geometry)
    cfg.output_dir, cfg.experiment_name, cfg.timestamp = Path(output_dir), "edit", "run"
    cfg.load_dir = Path(load_dir)
    cfg.max_num_iterations = size.edit_steps
    cfg.steps_per_save = max(1, size.edit_steps // 4)
    cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 1_000_000
    cfg.machine = _machine(size)
    cfg.vis = "tensorboard"
    return cfg


def config_differences(a: Any, b: Any, prefix: str = "") -> Iterator[str]:
    """Dotted names of the dataclass fields in which two configs differ (recursing into nested configs)."""
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        for f in dataclasses.fields(a):
            yield from config_differences(getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}.")
    elif isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        for k in a:
            yield from config_differences(a[k], b[k], f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def edit_steps_done(checkpoint: Path) -> int:
    """How many edit steps a piva checkpoint holds (its step minus the step the edit started from, plus one)."""
    from piva.nerfstudio.piva_pipeline import edit_start_step

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    start = edit_start_step(state["pipeline"])
    if start is None:
        raise ValueError(f"{checkpoint} is not a piva edit checkpoint")
    return state["step"] - start + 1


class RunMismatch(ValueError):
    """An edit's run folder holds an edit made from other prompts, knobs or another source scene."""


# What an edit's run is made from: a resume must match these (sizes and bookkeeping may differ).
_EDIT_IDENTITY = ("pipeline.guidance", "pipeline.diffusion_model", "pipeline.controlnet_model",
                  "pipeline.model.edit_geometry", "pipeline.render_short_side", "method_name")


def _edit_identity(config) -> dict:
    """The fields of an edit config that decide what it computes, as plain values."""
    out = {}
    for name in _EDIT_IDENTITY:
        value = config
        for part in name.split("."):
            value = getattr(value, part, None)
        out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return json.loads(json.dumps(out, default=str))


def _source_fingerprint(models_dir: Path) -> Optional[str]:
    from piva.io import file_fingerprint

    last = latest_checkpoint(models_dir) if Path(models_dir).is_dir() else None
    return file_fingerprint(last) if last is not None else None


def edit(config) -> Path:
    """Run an edit config to its last step; a killed edit resumes from its latest checkpoint.

    `config.max_num_iterations` is the number of edit steps wanted in all. Returns the run
    folder (config.yml + nerfstudio_models/). A run folder that holds an edit of other prompts,
    knobs or another source scene is refused (RunMismatch) instead of being resumed."""
    from piva.io import atomic_write_json

    run_dir = Path(config.get_base_dir())
    wanted = config.max_num_iterations
    last = latest_checkpoint(run_dir / "nerfstudio_models")
    record_path = run_dir / "piva_edit.json"
    made_from = {"config": _edit_identity(config), "source_checkpoint": _source_fingerprint(Path(config.load_dir))}
    if last is not None:
        if record_path.is_file():
            kept = json.loads(record_path.read_text())
            diff = sorted(k for k in made_from["config"] if kept["config"].get(k) != made_from["config"][k])
            if kept.get("source_checkpoint") != made_from["source_checkpoint"]:
                diff.append("source scene (its checkpoint changed)")
            if diff:
                raise RunMismatch(f"{run_dir} holds an edit made with another {', '.join(diff)}: resume it with its "
                                  "own settings, or give another output folder (or delete it to start again)")
        config.load_dir = run_dir / "nerfstudio_models"
    elif last is None:
        atomic_write_json(record_path, made_from)
    remaining = wanted - edit_steps_done(last) if last is not None else wanted
    if remaining > 0:
        config.max_num_iterations = remaining
        try:
            run(config)
        finally:
            config.max_num_iterations = wanted
    return run_dir


def run(config) -> Path:
    """Train in this process, seeded as `ns-train` seeds it; returns the checkpoint folder."""
    import random

    import numpy as np

    random.seed(config.machine.seed)
    np.random.seed(config.machine.seed)
    torch.manual_seed(config.machine.seed)
    config.set_timestamp()
    config.save_config()
    _reset_event_writers()  # one process runs many trainers (demo, benchmark workers): each logs to its own run
    try:
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        trainer.train()
    finally:
        _reset_event_writers()
    return config.get_checkpoint_dir()


def _reset_event_writers() -> None:
    """nerfstudio keeps its event writers in module globals that every trainer appends to: close and clear
    them, so a later run does not log into an earlier run's files nor leak their handles."""
    from nerfstudio.utils import writer

    for w in writer.EVENT_WRITERS:
        if hasattr(w, "tb_writer"):  # tensorboard holds an open event file; the local writer holds nothing
            w.tb_writer.close()
    writer.EVENT_WRITERS.clear()
    writer.EVENT_STORAGE.clear()


def reconstruct(scene: Union[ObjectScene, CaptureScene], output_dir: Path, size: RunSize = RunSize(), splats: bool = False) -> Path:
    """The source scene's nerfstudio run folder (nerfacto, or splatfacto with `splats`), trained once (an existing
    checkpoint is kept)."""
    cfg = (splat_source_config if splats else source_config)(scene, output_dir, size)
    run_dir = Path(cfg.get_base_dir())
    if not _finished(run_dir):
        import shutil

        shutil.rmtree(run_dir / "nerfstudio_models", ignore_errors=True)  # a killed fit: nerfstudio saves at its end
        run(cfg)
        _mark_finished(run_dir)
    return run_dir


_FINISHED = "piva_finished.json"


def _finished(run_dir: Path) -> bool:
    """A source fit counts only once its checkpoint is whole: nerfstudio writes it in place, so a fit killed while
    saving leaves a truncated file. Fits made before the marker existed are checked by loading them once."""
    last = latest_checkpoint(run_dir / "nerfstudio_models")
    if last is None:
        return False
    if (run_dir / _FINISHED).is_file():
        return True
    try:
        torch.load(last, map_location="cpu", weights_only=False)
    except Exception:  # truncated or corrupt: fit again
        return False
    _mark_finished(run_dir)
    return True


def _mark_finished(run_dir: Path) -> None:
    from piva.io import atomic_write_json, file_fingerprint

    last = latest_checkpoint(run_dir / "nerfstudio_models")
    atomic_write_json(run_dir / _FINISHED, {"checkpoint": last.name, "fingerprint": file_fingerprint(last)})


def cli_args(scene: ObjectScene, size: RunSize) -> list[str]:
    """The model settings of `source_config` as `ns-train` flags (runs the CLI on the same field)."""
    args = []
    for k, v in scene.model_settings(size).items():
        flag = "--pipeline.model." + k.replace("_", "-")
        args += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    return args + ["--pipeline.model.camera-optimizer.mode", "off"]
