"""threestudio systems: `piva-edit-system` edits a trained scene; `piva-reconstruction-system` trains one.

The edit loop, one random camera per step:

    edited = renderer(camera)                       # with grad: the scene being edited
    original = original_renderer(camera)            # no grad: frozen copy of the loaded scene
    loss = guidance(edited.rgb, depth, source_rgb=original.rgb)    # SDS / DDS / PiVa (piva.guidance)
    guidance.update_adapters(edited, original)      # PiVa's LoRA step, piva's own optimizer
    return loss                                     # threestudio's optimizer updates the scene

The frozen original is a copy of geometry, material, background and renderer made
after `system.geometry_convert_from` / `system.weights` are loaded. Its renderer keeps
its own occupancy grid (updated from the frozen geometry like the live one), and it
is saved in the checkpoint, so a resumed run still knows the scene as it was.
"""

from __future__ import annotations

from piva.threestudio.config import require_threestudio

require_threestudio("piva.threestudio.system")

import copy  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Dict, Optional  # noqa: E402

import threestudio  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from threestudio.systems.base import BaseLift3DSystem  # noqa: E402

from piva.metrics import psnr  # noqa: E402
from piva.threestudio.backend import GPU_PEAK_FILE  # noqa: E402
from piva.threestudio.config import EDIT_SYSTEM_NAME, RECONSTRUCTION_SYSTEM_NAME  # noqa: E402

ADAPTER_KEY = "piva_adapters"
ORIGINAL = ("original_geometry", "original_material", "original_background", "original_renderer")


def save_final_checkpoint(system: BaseLift3DSystem) -> None:
    """Save the step a run ends at. Lightning's ModelCheckpoint saves every N steps only, so a run whose length
    is no multiple of N would end with its newest checkpoint up to N-1 steps short (what an edit's
    geometry_convert_from and a rerun read). Saved as the callback saves: the step file, then last.ckpt."""
    trainer = system.trainer
    callback = trainer.checkpoint_callback
    if callback is None or getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
        return
    try:  # the callback's own steps (Lightning 2.0-2.6), so its top-k and link bookkeeping stay right
        candidates = callback._monitor_candidates(trainer)
        callback._save_topk_checkpoint(trainer, candidates)
        callback._save_last_checkpoint(trainer, candidates)
    except AttributeError:  # another Lightning: a plain last.ckpt
        trainer.save_checkpoint(str(Path(callback.dirpath) / "last.ckpt"))


def _scalar_logs(system: BaseLift3DSystem, values: Dict[str, Any], prefix: str = "train/") -> None:
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            continue
        system.log(prefix + name, value)


@threestudio.register(EDIT_SYSTEM_NAME)
class PivaEditSystem(BaseLift3DSystem):
    @dataclass
    class Config(BaseLift3DSystem.Config):
        save_adapters: bool = True  # write both adapters as diffusers LoRA folders (save/piva-adapters) after training

    cfg: Config

    def configure(self) -> None:
        super().configure()  # geometry (converted or fresh), material, background, renderer
        self._pending_adapters: Optional[dict] = None
        self.prompt_processor = None

    def post_configure(self) -> None:
        # Runs after system.weights is loaded: what exists now is the scene before the edit.
        super().post_configure()
        if not (self.cfg.geometry_convert_from or self.cfg.weights or self.resumed):
            raise ValueError(
                "piva-edit-system edits a trained scene: pass system.geometry_convert_from=<source run>/ckpts/last.ckpt "
                "or system.weights=<checkpoint>"
            )
        # One deepcopy of the four keeps the renderer pointing at the copied geometry/material/background.
        frozen = copy.deepcopy((self.geometry, self.material, self.background, self.renderer))
        for name, module in zip(ORIGINAL, frozen):
            module.requires_grad_(False)
            setattr(self, name, module)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.renderer(**batch)

    @torch.no_grad()
    def render_original(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.original_renderer(**batch)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.guidance = threestudio.find(self.cfg.guidance_type)(self.cfg.guidance)
        if not hasattr(self.guidance, "update_adapters"):
            raise ValueError(f"piva-edit-system needs guidance_type: piva-guidance, not {self.cfg.guidance_type!r}")
        if self.cfg.prompt_processor_type:  # optional: piva-guidance reads its prompts from its own config
            self.prompt_processor = threestudio.find(self.cfg.prompt_processor_type)(self.cfg.prompt_processor)
        if self._pending_adapters is not None:
            self.guidance.core.load_adapter_state(self._pending_adapters)
            self._pending_adapters = None

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> Dict[str, Any]:
        out = self(batch)
        if "depth" not in out and self.guidance.core.config.mode == "piva":
            raise ValueError(f"{self.cfg.renderer_type} returns no depth; PiVa's depth ControlNet needs a volume renderer")
        original = self.render_original(batch) if self.guidance.needs_original else None
        prompt_utils = self.prompt_processor() if self.prompt_processor is not None else None
        guidance_out = self.guidance(
            out["comp_rgb"],
            prompt_utils,
            batch.get("elevation"),
            batch.get("azimuth"),
            batch.get("camera_distances"),
            depth=out.get("depth"),
            opacity=out.get("opacity"),
            source_rgb=original["comp_rgb"] if original is not None else None,
        )
        adapter_out = {}
        if original is not None:
            adapter_out = self.guidance.update_adapters(
                out["comp_rgb"].detach(),
                depth=out.get("depth"),
                opacity=out.get("opacity"),
                source_rgb=original["comp_rgb"],
                source_depth=original.get("depth"),
                source_opacity=original.get("opacity"),
            )
        loss = 0.0
        for name, value in guidance_out.items():
            if name.startswith("loss_"):
                key = name.replace("loss_", "lambda_")
                if key not in self.cfg.loss:
                    raise KeyError(f"system.loss.{key} is missing: the guidance returns {name}")
                loss = loss + value * self.C(self.cfg.loss[key])
        _scalar_logs(self, {**guidance_out, **adapter_out})
        return {"loss": loss}

    # -- evaluation: edited and original side by side ---------------------------
    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        out, original = self(batch), self.render_original(batch)
        self.save_image_grid(
            f"it{self.true_global_step}-{int(batch['index'][0])}.png",
            [
                {"type": "rgb", "img": out["comp_rgb"][0], "kwargs": {"data_format": "HWC"}},
                {"type": "rgb", "img": original["comp_rgb"][0], "kwargs": {"data_format": "HWC"}},
                {"type": "grayscale", "img": out["opacity"][0, :, :, 0], "kwargs": {"cmap": None, "data_range": (0, 1)}},
            ],
            name="validation_step",
            step=self.true_global_step,
        )

    def on_validation_epoch_end(self) -> None:
        pass

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        # Separate folders so metrics compare edited and original renders of the same camera.
        index = int(batch["index"][0])
        for folder, out in (("test", self(batch)), ("test-original", self.render_original(batch))):
            self.save_rgb_image(f"it{self.true_global_step}-{folder}/{index}.png", out["comp_rgb"][0], data_format="HWC")

    def on_test_epoch_end(self) -> None:
        for folder in ("test", "test-original"):
            name = f"it{self.true_global_step}-{folder}"
            self.save_img_sequence(name, name, r"(\d+)\.png", save_format="mp4", fps=30, name=folder, step=self.true_global_step)

    # -- checkpoints: the adapters live outside threestudio's modules -----------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        guidance = getattr(self, "guidance", None)
        state = guidance.core.adapter_state() if guidance is not None else self._pending_adapters
        if state is not None:
            checkpoint[ADAPTER_KEY] = state

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint.get(ADAPTER_KEY)
        if state is None:
            return
        guidance = getattr(self, "guidance", None)
        if guidance is not None:
            guidance.core.load_adapter_state(state)
        else:
            self._pending_adapters = state

    def on_train_end(self) -> None:
        save_final_checkpoint(self)
        guidance = getattr(self, "guidance", None)
        if self.cfg.save_adapters and guidance is not None and guidance.core.distillation.adapters is not None:
            path = guidance.core.distillation.adapters.save(Path(self.get_save_dir()) / "piva-adapters")
            threestudio.info(f"[piva] adapters saved to {path} (diffusers LoRA folders)")

    def on_test_end(self) -> None:
        super().on_test_end()
        if torch.cuda.is_available() and self._save_dir is not None:  # the edit's own peak (benchmark/run.py reads it)
            peak = {"gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
            (Path(self.get_save_dir()) / GPU_PEAK_FILE).write_text(json.dumps(peak))


@threestudio.register(RECONSTRUCTION_SYSTEM_NAME)
class PivaReconstructionSystem(BaseLift3DSystem):
    """Fits a scene to posed images (rays from `piva-blender-datamodule`): the source scene of an edit.

    Losses: `lambda_rgb` * MSE to the images, `lambda_mask` * BCE of the opacity
    against the images' alpha (images without alpha have no mask loss). Its test step only renders, so the same system renders
    any checkpoint at threestudio's orbit cameras (piva/threestudio/configs/noe-eval-cameras.yaml).
    """

    @dataclass
    class Config(BaseLift3DSystem.Config):
        pass

    cfg: Config

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.renderer(**batch)

    def on_train_end(self) -> None:
        save_final_checkpoint(self)

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> Dict[str, Any]:
        out = self(batch)
        logs = {"loss_rgb": F.mse_loss(out["comp_rgb"], batch["gt_rgb"])}
        if "gt_mask" in batch and self.C(self.cfg.loss.get("lambda_mask", 0.0)) > 0:
            opacity = out["opacity"].clamp(1e-4, 1 - 1e-4)
            logs["loss_mask"] = F.binary_cross_entropy(opacity, batch["gt_mask"])
        loss = sum(v * self.C(self.cfg.loss[k.replace("loss_", "lambda_")]) for k, v in logs.items())
        _scalar_logs(self, {**logs, "psnr": psnr(out["comp_rgb"].detach(), batch["gt_rgb"])})
        return {"loss": loss}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        images = [{"type": "rgb", "img": out["comp_rgb"][0], "kwargs": {"data_format": "HWC"}}]
        if "gt_rgb" in batch:
            images.append({"type": "rgb", "img": batch["gt_rgb"][0], "kwargs": {"data_format": "HWC"}})
            self.log("val/psnr", psnr(out["comp_rgb"], batch["gt_rgb"]))
        images.append({"type": "grayscale", "img": out["opacity"][0, :, :, 0], "kwargs": {"cmap": None, "data_range": (0, 1)}})
        self.save_image_grid(
            f"it{self.true_global_step}-{int(batch['index'][0])}.png", images, name="validation_step", step=self.true_global_step
        )

    def on_validation_epoch_end(self) -> None:
        pass

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        self.save_rgb_image(f"it{self.true_global_step}-test/{int(batch['index'][0])}.png", out["comp_rgb"][0], data_format="HWC")
        if "gt_rgb" in batch:
            self.log("test/psnr", psnr(out["comp_rgb"], batch["gt_rgb"]))

    def on_test_epoch_end(self) -> None:
        name = f"it{self.true_global_step}-test"
        self.save_img_sequence(name, name, r"(\d+)\.png", save_format="mp4", fps=30, name="test", step=self.true_global_step)
