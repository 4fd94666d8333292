"""Small nerfacto configs for toy scenes on a CPU: train the source scene, then edit it with `ns-train piva`.

The source scene is trained with nerfstudio's own Trainer and nerfacto (offline-safe
model class, same weights layout), so the checkpoint is what `ns-train nerfacto` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# ~0.15 s/iter on 2 CPU cores with the torch hash grid (measured for this size class).
SMALL_NERFACTO = dict(
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
    average_init_density=0.01,
    use_appearance_embedding=False,
    near_plane=1.5,
    far_plane=6.0,
)

# Synthetic objects on a GPU: nerfacto defaults, with the object-centred near/far of a radius-2 object.
FULL_NERFACTO = dict(average_init_density=0.01, near_plane=0.5, far_plane=8.0, background_color="white")


def backdrop(white_background: bool) -> tuple[float, float, float]:
    """Object scenes sit on a fixed backdrop (toy world: grey; Noe and NeRF-synthetic: white), so
    an edit cannot recolour the background through the shared colour MLP (docs/toyworld.md)."""
    from piva.toyworld.scenes import BACKGROUND

    return (1.0, 1.0, 1.0) if white_background else (BACKGROUND,) * 3


def model_settings(small: bool, white_background: bool) -> dict:
    return dict(SMALL_NERFACTO if small else FULL_NERFACTO, backdrop_rgb=backdrop(white_background))


def small_model_cli_args() -> list[str]:
    """The same settings as `ns-train` flags, for running the CLI on a toy scene."""
    args = []
    for k, v in model_settings(small=True, white_background=False).items():
        flag = "--pipeline.model." + k.replace("_", "-")
        args += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    return args + ["--pipeline.model.camera-optimizer.mode", "off"]


def blender_parser(data: Path, white_background: bool = False):
    """Toy datasets are RGB on grey (no alpha); RGBA datasets (Noe, NeRF-synthetic) go on white."""
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    return BlenderDataParserConfig(data=Path(data), alpha_color="white" if white_background else None)


def source_scene_config(
    data: Path,
    output_dir: Path,
    steps: int = 1500,
    rays: int = 1024,
    small: bool = True,
    device: str = "cpu",
    white_background: bool = False,
):
    """nerfacto on a Blender dataset; `small` is the CPU size that reconstructs a toy scene in minutes."""
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
    from nerfstudio.configs.base_config import MachineConfig
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
    from nerfstudio.engine.optimizers import AdamOptimizerConfig
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig

    from piva.nerfstudio.piva_model import PivaNerfactoModelConfig

    return TrainerConfig(
        method_name="nerfacto",
        experiment_name="source",
        timestamp="run",
        output_dir=Path(output_dir),
        max_num_iterations=steps,
        steps_per_save=steps,
        steps_per_eval_batch=1_000_000,
        steps_per_eval_image=1_000_000,
        steps_per_eval_all_images=1_000_000,
        save_only_latest_checkpoint=True,
        mixed_precision=False,
        machine=MachineConfig(device_type=device, num_devices=1),
        pipeline=VanillaPipelineConfig(
            datamanager=VanillaDataManagerConfig(dataparser=blender_parser(data, white_background),
                                                 train_num_rays_per_batch=rays),
            model=PivaNerfactoModelConfig(**model_settings(small, white_background),
                                          camera_optimizer=CameraOptimizerConfig(mode="off")),
        ),
        optimizers={
            "proposal_networks": {
                "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=steps),
            },
            "fields": {
                "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=steps),
            },
        },
        vis="tensorboard",
    )


def edit_config(
    data: Path,
    load_dir: Path,
    output_dir: Path,
    source_prompt: str,
    target_prompt: str,
    model_dir: Path,
    controlnet_dir: Optional[Path],
    method: str = "piva",
    steps: int = 300,
    render_short_side: int = 32,
    lr: float = 1e-3,
    mlp_lr: Optional[float] = None,
    identity_weight: float = 0.4,
    rays: int = 256,
    small: bool = True,
    device: str = "cpu",
    white_background: bool = False,
    same_latent: Optional[bool] = None,
    edit_geometry: bool = True,
):
    """The registered `piva` method config (what `ns-train piva` builds from flags), sized for toy or full scenes."""
    import dataclasses

    from nerfstudio.configs.base_config import MachineConfig
    from nerfstudio.engine.optimizers import AdamOptimizerConfig

    from piva.nerfstudio.piva_config import piva_trainer_config

    cfg = piva_trainer_config(
        "piva" if method == "piva" else "piva-dds",
        method=method,
        source_prompt=source_prompt,
        target_prompt=target_prompt,
        diffusion_model=str(model_dir),
        controlnet_model=str(controlnet_dir or ""),
        render_short_side=render_short_side,
        identity_weight=identity_weight,
        anneal_after=steps // 2,
        depth_far=5.5,
        same_latent=same_latent,
    )
    cfg.pipeline.datamanager = dataclasses.replace(
        cfg.pipeline.datamanager, dataparser=blender_parser(data, white_background), train_num_rays_per_batch=rays
    )
    cfg.pipeline.model = dataclasses.replace(cfg.pipeline.model, **model_settings(small, white_background),
                                             edit_geometry=edit_geometry)
    cfg.optimizers = {k: {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": None} for k in cfg.optimizers}
    if mlp_lr is not None:
        cfg.optimizers["field_mlps"]["optimizer"].lr = mlp_lr
    cfg.output_dir = Path(output_dir)
    cfg.experiment_name = "edit"
    cfg.timestamp = "run"
    cfg.load_dir = Path(load_dir)
    cfg.max_num_iterations = steps
    cfg.steps_per_save = max(1, steps // 4)
    cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 1_000_000
    cfg.machine = MachineConfig(device_type=device, num_devices=1)
    cfg.vis = "tensorboard"
    return cfg


def edit_scene(config) -> Path:
    """Run an edit config to its last step; a killed edit resumes from its latest checkpoint.

    `config.max_num_iterations` is the number of edit steps wanted in all. Returns the
    run folder (config.yml + nerfstudio_models/).
    """
    import torch

    run_dir = Path(config.get_base_dir())
    done = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    steps = config.max_num_iterations
    remaining = steps
    if done:
        last = torch.load(done[-1], map_location="cpu", weights_only=False)
        remaining = last["pipeline"]["piva.meta"]["edit_start_step"] + steps - 1 - last["step"]
        config.load_dir = run_dir / "nerfstudio_models"
    if remaining > 0:
        config.max_num_iterations = remaining
        run(config)
        config.max_num_iterations = steps
    return run_dir


def run(config) -> Path:
    """Train in this process, as `ns-train` does; returns the checkpoint folder."""
    import random

    import numpy as np
    import torch

    random.seed(config.machine.seed)
    np.random.seed(config.machine.seed)
    torch.manual_seed(config.machine.seed)
    config.set_timestamp()
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    return config.get_checkpoint_dir()

