"""`ns-train piva`, `piva-dds` and `piva-small`: method specifications for nerfstudio.

    ns-train piva --data DATA --load-dir RUN/nerfstudio_models \
        --pipeline.guidance.source-prompt "a photo of a man" \
        --pipeline.guidance.target-prompt "a photo of a man with a beard"

The methods differ only in the settings named below; what a user, the demo and the
benchmark run is one of these configs, with sizes changed at most (piva.nerfstudio.runs).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.plugins.types import MethodSpecification

from piva.nerfstudio.piva_model import PivaNerfactoModelConfig
from piva.nerfstudio.piva_pipeline import PivaPipelineConfig
from piva.nerfstudio.piva_trainer import PivaTrainerConfig
from piva.nerfstudio.splat_model import PivaSplatfactoModelConfig


def piva_trainer_config(method_name: str = "piva", guidance: Optional[dict] = None, **pipeline_overrides) -> PivaTrainerConfig:
    """Paper defaults for real scenes: scene lr 1e-3, adapter lr 1e-4, lambda 0.2, short side 512.

    `guidance` overrides fields of the pipeline's GuidanceConfig, `pipeline_overrides` its other fields."""
    pipeline = PivaPipelineConfig(
        datamanager=VanillaDataManagerConfig(dataparser=NerfstudioDataParserConfig(), train_num_rays_per_batch=4096),
        # Camera poses stay as reconstructed: the edit must not move the cameras.
        model=PivaNerfactoModelConfig(
            eval_num_rays_per_chunk=1 << 15, average_init_density=0.01, camera_optimizer=CameraOptimizerConfig(mode="off"),
            separate_mlp_group=True,
        ),
    )
    pipeline = dataclasses.replace(pipeline, **pipeline_overrides)
    pipeline.guidance = dataclasses.replace(pipeline.guidance, **(guidance or {}))
    return PivaTrainerConfig(
        method_name=method_name,
        steps_per_eval_batch=1000,
        steps_per_eval_image=500,
        steps_per_eval_all_images=1_000_000,
        steps_per_save=250,
        max_num_iterations=15000,
        save_only_latest_checkpoint=True,
        # Our backward pass runs inside the pipeline (two-pass rendering), outside the AMP grad scaler:
        # PivaTrainer refuses --mixed-precision True (and --use-grad-scaler True) before anything loads.
        mixed_precision=False,
        pipeline=pipeline,
        optimizers={
            "proposal_networks": {"optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15), "scheduler": None},
            "fields": {"optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15), "scheduler": None},
            # The field's MLPs (colour head above all): own group so they can be slowed (see PivaNerfactoModelConfig).
            "field_mlps": {"optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15), "scheduler": None},
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


SPLAT_EDIT_COLOUR_LR = 0.02
"""Colour (SH) lr of a splat edit: 8x splatfacto's fitting value, which moves a colour too little in the
hundreds of steps an edit has (toy red cube -> "a blue cube", share of the object's pixels that turn blue:
0.0025, 60 steps: none; 0.02: 40 % at 100 steps, 54 % at 200; 0.05, 100 steps: 53 %)."""


def splat_optimizers(steps: int = 15000, colour_lr: float = 0.0025) -> dict:
    """splatfacto's own optimiser settings (nerfstudio's method_configs), the positions' decay over the run;
    `colour_lr` for the SH colours (splatfacto: 0.0025, the rest of the SH at 1/20 of it)."""
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig

    def adam(lr: float) -> dict:
        return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": None}

    return {
        "means": {"optimizer": AdamOptimizerConfig(lr=1.6e-4, eps=1e-15),
                  "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=steps)},
        "features_dc": adam(colour_lr), "features_rest": adam(colour_lr / 20), "opacities": adam(0.05),
        "scales": adam(0.005), "quats": adam(0.001), "camera_opt": adam(1e-4),
    }


def piva_splat_trainer_config(method_name: str = "piva-splat", guidance: Optional[dict] = None,
                              **pipeline_overrides) -> PivaTrainerConfig:
    """The same edit on a splatfacto scene: whole views rendered with depth, splatfacto's optimiser settings.

    Geometry and densification follow the method's rule (kept for a colour-only edit); `edit_geometry` overrides."""
    from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig

    config = piva_trainer_config(method_name, guidance=guidance, **pipeline_overrides)
    config.pipeline.datamanager = FullImageDatamanagerConfig(dataparser=NerfstudioDataParserConfig(),
                                                             cache_images_type="uint8")
    config.pipeline.model = PivaSplatfactoModelConfig(camera_optimizer=CameraOptimizerConfig(mode="off"),
                                                      edit_geometry=None)
    config.optimizers = splat_optimizers(config.max_num_iterations, colour_lr=SPLAT_EDIT_COLOUR_LR)
    return config


piva_method = MethodSpecification(
    config=piva_trainer_config("piva"),
    description="PiVa: DDS + identity-preserving dual-LoRA regulariser (edits a trained nerfacto scene)",
)
# The paper's object setting (Noe, NeRF-synthetic; the toy world): lambda 0.4 instead of 0.2.
piva_object_method = MethodSpecification(
    config=piva_trainer_config("piva-object", guidance=dict(identity_weight=0.4)),
    description="PiVa for a single object on a plain backdrop (lambda 0.4, the paper's object setting)",
)
piva_dds_method = MethodSpecification(
    config=piva_trainer_config("piva-dds", guidance=dict(mode="dds")),
    description="Delta Denoising Score baseline on a trained nerfacto scene",
)
piva_sds_method = MethodSpecification(
    config=piva_trainer_config("piva-sds", guidance=dict(mode="sds")),
    description="Score Distillation Sampling baseline (target prompt only) on a trained nerfacto scene",
)
piva_small_method = MethodSpecification(
    config=piva_trainer_config("piva-small", render_short_side=384, rays_per_chunk=1 << 12, diffusion_dtype="float16"),
    description="PiVa with smaller renders, smaller chunks and fp16 diffusion: for ~16-24 GB GPUs",
)

# Gaussian splats (splatfacto scenes); on CPU through piva's own rasteriser (toy sizes).
piva_splat_method = MethodSpecification(
    config=piva_splat_trainer_config("piva-splat", guidance=dict(identity_weight=0.4)),
    description="PiVa on a trained splatfacto scene (Gaussian splats; lambda 0.4, the object setting)",
)
piva_splat_dds_method = MethodSpecification(
    config=piva_splat_trainer_config("piva-splat-dds", guidance=dict(mode="dds")),
    description="Delta Denoising Score baseline on a trained splatfacto scene",
)



def piva_nerfacto_config() -> "TrainerConfig":  # noqa: F821
    """nerfacto for a capture's source scene, buildable offline (nerfstudio's own nerfacto downloads AlexNet at
    start-up): the fit the benchmark makes (piva.nerfstudio.runs.source_config) at nerfacto's 30,000 steps,
    with nerfstudio's parser defaults. Cameras stay as COLMAP made them, as every piva edit keeps them."""
    from pathlib import Path

    from piva.nerfstudio.runs import CaptureScene, RunSize, source_config

    config = source_config(CaptureScene(Path("data")), Path("outputs"), RunSize(source_steps=30000))
    config.method_name, config.experiment_name, config.timestamp = "piva-nerfacto", None, "{timestamp}"
    config.pipeline.datamanager.dataparser = NerfstudioDataParserConfig()
    config.steps_per_save, config.vis = 2000, "viewer"
    return config


piva_nerfacto_method = MethodSpecification(
    config=piva_nerfacto_config(),
    description="nerfacto for the source scene that also starts offline (same fields and checkpoints as nerfacto)",
)
SOURCE_METHODS = {"piva-nerfacto": piva_nerfacto_method}
"""Methods that make a source scene rather than edit one."""

METHODS = {
    "piva": piva_method, "piva-object": piva_object_method, "piva-dds": piva_dds_method,
    "piva-sds": piva_sds_method, "piva-small": piva_small_method,
    "piva-splat": piva_splat_method, "piva-splat-dds": piva_splat_dds_method,
}
