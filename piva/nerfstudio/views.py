"""Load a finished nerfstudio run and render it at any cameras (framework side of the evaluators)."""

from __future__ import annotations

from pathlib import Path

import torch

from piva.data.views import Camera
from piva.nerfstudio.runs import latest_checkpoint


def load_pipeline(run_dir: Path, device: str = "cpu"):
    """A trained nerfstudio run (config.yml + latest checkpoint) -> its pipeline, in eval mode.

    Like nerfstudio's eval_setup, but the checkpoint is read with weights_only=False:
    nerfstudio's own scheduler states hold numpy scalars, which torch>=2.6 refuses by default.
    Only for checkpoints piva itself wrote (the demo, the benchmark).
    """
    import yaml

    config = yaml.load((Path(run_dir) / "config.yml").read_text(), Loader=yaml.Loader)
    pipeline = config.pipeline.setup(device=device, test_mode="inference", world_size=1, local_rank=0)
    ckpt = latest_checkpoint(Path(run_dir) / "nerfstudio_models")
    if ckpt is None:
        raise FileNotFoundError(f"no step-*.ckpt in {run_dir}/nerfstudio_models: has the run saved a checkpoint?")
    state = torch.load(ckpt, map_location=device, weights_only=False)
    pipeline.load_pipeline(state["pipeline"], state["step"])
    return pipeline.eval(), state["step"]


@torch.no_grad()
def render_views(pipeline, cams: list[Camera], progress: str = "") -> dict[str, torch.Tensor]:
    """Render cameras (world frame of the Blender dataset) with a nerfstudio model: rgb [N,3,H,W], depth [N,1,H,W]."""
    from nerfstudio.cameras.cameras import Cameras, CameraType

    rgbs, depths = [], []
    if progress:
        from tqdm.auto import tqdm

        cams = tqdm(cams, desc=progress)
    for cam in cams:
        c2w = torch.from_numpy(cam.c2w[:3]).float()[None]
        c = Cameras(camera_to_worlds=c2w, fx=cam.focal, fy=cam.focal, cx=cam.width / 2, cy=cam.height / 2,
                    width=cam.width, height=cam.height, camera_type=CameraType.PERSPECTIVE).to(pipeline.device)
        out = pipeline.model.get_outputs_for_camera(c)
        rgbs.append(out["rgb"].clamp(0, 1).permute(2, 0, 1).cpu())
        depths.append(out["depth"].permute(2, 0, 1).cpu())
    return {"rgb": torch.stack(rgbs), "depth": torch.stack(depths)}
