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

from piva.threestudio.config import require_threestudio

require_threestudio("piva.threestudio.data")

from typing import Any, Dict, Iterator, List, Optional  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import threestudio  # noqa: E402
import torch  # noqa: E402
from threestudio.utils.config import parse_structured  # noqa: E402
from torch.utils.data import DataLoader, Dataset, IterableDataset  # noqa: E402

from piva.threestudio.blender import BlenderDataSettings, PosedImages  # noqa: E402
from piva.threestudio.config import DATAMODULE_NAME  # noqa: E402


def _images(cfg: BlenderDataSettings, split: str, downsample: int = 1) -> PosedImages:
    images = PosedImages(cfg.dataroot, split, cfg.background_color, downsample)
    threestudio.info(f"[piva] {len(images)} {split} views of {cfg.dataroot} ({images.width}x{images.height})")
    return images


class BlenderRays(IterableDataset):
    def __init__(self, cfg: BlenderDataSettings) -> None:
        super().__init__()
        self.cfg = cfg
        self.images = _images(cfg, cfg.train_split)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        while True:
            yield self.sample()

    def sample(self) -> Dict[str, Any]:
        n = self.cfg.rays_per_batch
        rays = self.images.random_rays(n)
        batch = {
            "rays_o": rays["rays_o"].view(1, 1, n, 3),
            "rays_d": rays["rays_d"].view(1, 1, n, 3),
            "gt_rgb": rays["rgb"].view(1, 1, n, 3),
            "light_positions": torch.zeros(1, 3),
            "height": 1,
            "width": n,
        }
        if self.images.has_alpha:  # no alpha, no mask: the opacity loss would fill empty space
            batch["gt_mask"] = rays["mask"].view(1, 1, n, 1)
        return batch


class BlenderViews(Dataset):
    def __init__(self, cfg: BlenderDataSettings, split: str, n_views: Optional[int] = None) -> None:
        super().__init__()
        self.images = _images(cfg, split, cfg.eval_downsample)
        count = len(self.images)
        self.indices: List[int] = list(range(count))
        if n_views is not None and n_views < count:
            self.indices = torch.linspace(0, count - 1, n_views).round().long().tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        im, k = self.images, self.indices[i]
        rays_o, rays_d = im.rays(k)
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
