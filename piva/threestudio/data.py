"""`piva-blender-datamodule`: posed images in the Blender layout (NeRF synthetic, Noe's prepared views).

    data_type: piva-blender-datamodule
    data: {dataroot: DATA, rays_per_batch: 4096}

Training batches are random rays from all training images, shaped [1,1,N,3] so
threestudio's renderers take them as an image of one row. Validation/test batches
are whole views. Poses are used as written (object at the origin); threestudio's
`multiview-camera-datamodule` re-centres cameras and needs an OPENCV transforms.json,
which does not fit object-centric hemisphere captures.
"""

from __future__ import annotations

from piva.threestudio.core import require_threestudio

require_threestudio("piva.threestudio.data")

from typing import Any, Dict, Iterator, List, Optional  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import threestudio  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from threestudio.utils.config import parse_structured  # noqa: E402
from torch.utils.data import DataLoader, Dataset, IterableDataset  # noqa: E402

from piva.threestudio.core import (  # noqa: E402
    DATAMODULE_NAME,
    BlenderDataSettings,
    Views,
    image_rays,
    load_rgba,
    pixel_rays,
    read_views,
)


class _Images:
    """One split's cameras and images (RGB composited on the background, alpha kept as the mask)."""

    def __init__(self, cfg: BlenderDataSettings, split: str, downsample: int = 1) -> None:
        views: Views = read_views(cfg.dataroot, split)
        rgbs, masks = zip(*(load_rgba(p, cfg.background_color) for p in views.image_paths))
        rgb, mask = torch.stack(rgbs), torch.stack(masks)  # [N,H,W,3], [N,H,W,1]
        if rgb.shape[1:3] != (views.height, views.width):
            raise ValueError(f"{split} images are {tuple(rgb.shape[1:3])}, the transforms say {views.height}x{views.width}")
        intr = views.intrinsics.clone()
        if downsample > 1:
            size = (views.height // downsample, views.width // downsample)
            rgb = F.interpolate(rgb.permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1)
            mask = F.interpolate(mask.permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1)
            intr *= torch.tensor([size[1] / views.width, size[0] / views.height] * 2)
        self.c2w, self.intrinsics, self.rgb, self.mask = views.c2w, intr, rgb, mask
        self.height, self.width = rgb.shape[1:3]
        threestudio.info(f"[piva] {len(rgb)} {split} views of {cfg.dataroot} ({self.width}x{self.height})")


class BlenderRays(IterableDataset):
    def __init__(self, cfg: BlenderDataSettings) -> None:
        super().__init__()
        self.cfg = cfg
        self.images = _Images(cfg, cfg.train_split)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        while True:
            yield self.sample()

    def sample(self) -> Dict[str, Any]:
        im, n = self.images, self.cfg.rays_per_batch
        idx = torch.randint(0, len(im.rgb), (n,))
        v, u = torch.randint(0, im.height, (n,)), torch.randint(0, im.width, (n,))
        rays_o, rays_d = pixel_rays(im.c2w[idx], im.intrinsics[idx], u.float(), v.float())
        return {
            "rays_o": rays_o.view(1, 1, n, 3),
            "rays_d": rays_d.view(1, 1, n, 3),
            "gt_rgb": im.rgb[idx, v, u].view(1, 1, n, 3),
            "gt_mask": im.mask[idx, v, u].view(1, 1, n, 1),
            "light_positions": torch.zeros(1, 3),
            "height": 1,
            "width": n,
        }


class BlenderViews(Dataset):
    def __init__(self, cfg: BlenderDataSettings, split: str, n_views: Optional[int] = None) -> None:
        super().__init__()
        self.images = _Images(cfg, split, cfg.eval_downsample)
        count = len(self.images.rgb)
        self.indices: List[int] = list(range(count))
        if n_views is not None and n_views < count:
            self.indices = torch.linspace(0, count - 1, n_views).round().long().tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        im, k = self.images, self.indices[i]
        rays_o, rays_d = image_rays(im.c2w[k], im.intrinsics[k], im.height, im.width)
        return {
            "index": k,
            "rays_o": rays_o,
            "rays_d": rays_d,
            "c2w": im.c2w[k],
            "gt_rgb": im.rgb[k],
            "gt_mask": im.mask[k],
            "light_positions": im.c2w[k, :3, 3],
            "height": im.height,
            "width": im.width,
        }


@threestudio.register(DATAMODULE_NAME)
class BlenderDataModule(pl.LightningDataModule):
    cfg: BlenderDataSettings

    def __init__(self, cfg: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.cfg = parse_structured(BlenderDataSettings, cfg)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self.train_dataset = BlenderRays(self.cfg)
        if stage in (None, "fit", "validate"):
            self.val_dataset = BlenderViews(self.cfg, self.cfg.val_split, self.cfg.n_val_views)
        if stage in (None, "test", "predict"):
            self.test_dataset = BlenderViews(self.cfg, self.cfg.test_split)

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: each item already is a batch; one process, as threestudio's data modules.
        return DataLoader(self.train_dataset, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=1, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=1, num_workers=0)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
