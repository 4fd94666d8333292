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

    return render_cameras(pipeline, [
        Cameras(camera_to_worlds=torch.from_numpy(cam.c2w[:3]).float()[None], fx=cam.focal, fy=cam.focal,
                cx=cam.width / 2, cy=cam.height / 2, width=cam.width, height=cam.height,
                camera_type=CameraType.PERSPECTIVE) for cam in cams], progress)


@torch.no_grad()
def render_cameras(pipeline, cameras, progress: str = "") -> dict[str, torch.Tensor]:
    """Render nerfstudio `Cameras` (each one camera, or one batch of them) already in the run's world frame, e.g.
    a dataparser's held-out views: rgb [N,3,H,W], depth [N,1,H,W]."""
    cams = [cameras[i : i + 1] for i in range(len(cameras))] if not isinstance(cameras, list) else cameras
    if progress:
        from tqdm.auto import tqdm

        cams = tqdm(cams, desc=progress)
    rgbs, depths = [], []
    for c in cams:
        out = pipeline.model.get_outputs_for_camera(c.to(pipeline.device))
        rgbs.append(out["rgb"].clamp(0, 1).permute(2, 0, 1).cpu())
        depths.append(out["depth"].permute(2, 0, 1).cpu())
    return {"rgb": torch.stack(rgbs), "depth": torch.stack(depths)}


def held_out_views(scene) -> tuple:
    """A capture's held-out cameras (in the frame nerfstudio trains it in) and their photographs [N,3,H,W]:
    what a capture is evaluated at, as nerfstudio's own eval split chooses them."""
    import imageio.v3 as iio

    outputs = scene.parser().setup().get_dataparser_outputs(split="test")
    photos = []
    for path, w, h in zip(outputs.image_filenames, outputs.cameras.width.flatten().tolist(),
                          outputs.cameras.height.flatten().tolist()):
        pixels = iio.imread(path)
        pixels = pixels[..., None].repeat(3, -1) if pixels.ndim == 2 else pixels[..., :3]
        img = torch.from_numpy(pixels.copy()).float().div(255).permute(2, 0, 1)
        if tuple(img.shape[1:]) != (h, w):
            raise ValueError(f"{path} is {img.shape[2]}x{img.shape[1]}, but its camera is {w}x{h}: remake the "
                             f"downscaled images (delete the images_N folder) or fix transforms.json's w/h")
        photos.append(img)
    return outputs.cameras, torch.stack(photos), [Path(p) for p in outputs.image_filenames]
