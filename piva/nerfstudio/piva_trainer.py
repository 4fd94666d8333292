"""Trainer: atomic checkpoints, and starting an edit from a nerfacto run vs resuming a piva run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Type

import torch
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from piva.io import atomic_torch_save
from piva.nerfstudio.runs import latest_checkpoint


@dataclass
class PivaTrainerConfig(TrainerConfig):
    _target: Type = field(default_factory=lambda: PivaTrainer)
    target_only_lr_scales: Dict[str, float] = field(default_factory=lambda: dict(TARGET_ONLY_LR_SCALES))
    """Multiplier of each optimizer group's lr during the guidance's target-only steps (default 10 for each of
    nerfacto's groups; groups not named keep their lr). See
    docs/toyworld.md#geometry-edits-grow-first-with-the-target-caption-alone."""


TARGET_ONLY_LR_SCALES = {"fields": 10.0, "proposal_networks": 10.0, "field_mlps": 10.0}


def _fail(message: str) -> None:
    raise SystemExit(f"piva: error: {message}")


class PivaTrainer(Trainer):
    config: PivaTrainerConfig

    def __init__(self, config: PivaTrainerConfig, *args, **kwargs) -> None:
        # The pipeline backpropagates the score itself, outside nerfstudio's AMP grad scaler: the scaler's
        # unscale would divide that gradient by its scale (65536) before each step and the edit would stall.
        for flag in ("mixed_precision", "use_grad_scaler"):
            if getattr(config, flag, False):
                _fail(f"--{flag.replace('_', '-')} True does not work with {config.method_name}: its edit gradient "
                      f"bypasses the AMP grad scaler and would stall; run with --{flag.replace('_', '-')} False "
                      "(--pipeline.diffusion-dtype float16 halves the diffusion model instead)")
        try:  # bad prompts or settings: one line, before any data or weights are loaded
            config.pipeline.guidance.validate()
        except ValueError as exc:
            _fail(f"{exc} (set --pipeline.guidance.source-prompt / --pipeline.guidance.target-prompt)")
        if getattr(config.pipeline, "seed", 0) is None:  # the edit's draws follow --machine.seed
            config.pipeline.seed = config.machine.seed
        super().__init__(config, *args, **kwargs)

    def setup(self, test_mode="val") -> None:
        super().setup(test_mode=test_mode)
        from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

        # nerfstudio runs max_num_iterations steps from the loaded step but shows progress and
        # ETA against step 0, so an edit from a nerfacto run at step 30000 read "200 %, ETA 23 h".
        self.callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self._progress_end,
                                              iters=(self._start_step,)))

    def _progress_end(self, step: int) -> None:
        from nerfstudio.utils.writer import GLOBAL_BUFFER

        GLOBAL_BUFFER["max_iter"] = self._start_step + self.config.max_num_iterations

    def train_iteration(self, step: int):
        """One step; during the guidance's target-only steps each group steps at its `target_only_lr_scales`
        x its lr (restored before the schedulers step, so schedules and checkpoints see the plain lr)."""
        start = getattr(self.pipeline, "edit_start_step", None)
        edit_step = step - (step if start is None else start)
        if edit_step >= (self.pipeline.config.guidance.target_only_steps or 0):
            return super().train_iteration(step)
        optimizers = self.optimizers
        plain_step = optimizers.optimizer_scaler_step_some
        scales = self.config.target_only_lr_scales

        def scaled_step(grad_scaler, param_groups) -> None:
            groups = [(g, scales[name]) for name in param_groups if name in scales
                      for g in optimizers.optimizers[name].param_groups]
            lrs = [g["lr"] for g, _ in groups]
            for g, scale in groups:
                g["lr"] *= scale
            try:
                plain_step(grad_scaler, param_groups)
            finally:
                for (g, _), lr in zip(groups, lrs):
                    g["lr"] = lr

        optimizers.optimizer_scaler_step_some = scaled_step
        try:
            return super().train_iteration(step)
        finally:
            del optimizers.optimizer_scaler_step_some

    def _load_checkpoint(self) -> None:
        """A nerfacto checkpoint starts an edit (its field only); a piva checkpoint resumes everything."""
        cfg = self.config
        if cfg.load_checkpoint is not None:
            path = Path(cfg.load_checkpoint)
        elif cfg.load_dir is not None:
            d = Path(cfg.load_dir)
            if not d.is_dir():
                _fail(f"--load-dir {d} does not exist: pass the nerfstudio_models folder of a trained nerfacto run")
            path = d / f"step-{cfg.load_step:09d}.ckpt" if cfg.load_step is not None else latest_checkpoint(d)
            if path is None:
                _fail(f"no step-*.ckpt in {d}: point --load-dir at a run's nerfstudio_models folder")
        else:
            _fail("ns-train piva edits a trained scene: pass --load-dir RUN/nerfstudio_models of a nerfacto run")
        if not path.is_file():
            _fail(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated or foreign file
            _fail(f"cannot read checkpoint {path} ({type(exc).__name__}): is it a nerfstudio checkpoint?")
        if "pipeline" not in state or "step" not in state:
            _fail(f"{path} is not a nerfstudio checkpoint")
        resuming = "piva.meta" in state["pipeline"]
        try:
            self.pipeline.load_pipeline(state["pipeline"], state["step"])
        except ValueError as exc:
            _fail(str(exc))
        self._start_step = state["step"] + 1
        if getattr(self.pipeline, "renders_splats", False):
            # splatfacto's load_state_dict makes new Parameters sized to the checkpoint's Gaussians: the
            # optimizers built before the load would train the old ones.
            self.optimizers = self.setup_optimizers()
        if resuming:
            self.optimizers.load_optimizers(state["optimizers"])
            if "schedulers" in state and cfg.load_scheduler:
                self.optimizers.load_schedulers(state["schedulers"])
            self.grad_scaler.load_state_dict(state["scalers"])
            CONSOLE.print(f"[piva] resuming the edit from {path} at step {self._start_step}")
        else:
            # A fresh edit: the reconstruction run's optimizer states and schedules do not apply.
            self.pipeline.source_checkpoint = path
            if getattr(self.pipeline, "renders_splats", False):
                self._follow_trained_rasterize_mode(path)
            CONSOLE.print(f"[piva] starting an edit from {path} (step {state['step']})")

    def _follow_trained_rasterize_mode(self, path: Path) -> None:
        """Draw the splats as the source run was trained (classic or antialiased): the other mode changes how
        every Gaussian looks before the edit has done anything."""
        from piva.nerfstudio.splat_model import trained_rasterize_mode

        model_config = self.pipeline.model.config
        trained = trained_rasterize_mode(path)
        if trained is not None and trained != model_config.rasterize_mode:
            CONSOLE.print(f"[piva] the source scene was trained with rasterize_mode {trained}: the edit draws it so "
                          f"(not {model_config.rasterize_mode})")
            model_config.rasterize_mode = trained
        if model_config.rasterize_mode == "classic":
            CONSOLE.print("[piva] note: classic splats swell when drawn below their training resolution, as the edit's "
                          "views are; a source trained with --pipeline.model.rasterize-mode antialiased avoids it")

    def save_checkpoint(self, step: int) -> None:
        """Write to a temporary file beside the folder, then rename: a kill never leaves a broken latest checkpoint."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        # The temporary file waits outside the folder nerfstudio lists for its latest step.
        atomic_torch_save(
            {
                "step": step,
                "pipeline": pipeline.state_dict(),
                "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
                "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
                "scalers": self.grad_scaler.state_dict(),
            },
            ckpt_path,
            tmp_dir=self.checkpoint_dir.parent,
        )
        if self.config.save_only_latest_checkpoint:
            for f in self.checkpoint_dir.glob("*.ckpt"):
                if f != ckpt_path:
                    f.unlink()
