"""The threestudio front end's glue, kept free of threestudio so it runs (and is tested) anywhere.

threestudio hands renders around channels-last ([B,H,W,3]) with an unnormalised
depth (sum of weight * distance) and an opacity; `piva.guidance` wants
channels-first images in [0,1] and a depth where background is 0 or inf. This
module does that conversion, builds the `GuidanceConfig` from a YAML section,
calls `ScoreDistillation.step` / `update_adapters`, and reads Blender-layout
datasets. The registered classes in `guidance.py`, `system.py` and `data.py` are
thin shells over it; none of the method's math lives here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, List, Literal, Mapping, Optional, Sequence, Tuple, Union, get_origin, get_type_hints

import torch
import torch.nn.functional as F

from piva.guidance import MODES, GuidanceConfig, ScoreDistillation
from piva.prior import DEFAULT_CONTROLNET, DEFAULT_MODEL, DiffusionPrior

# Names registered with threestudio (guidance.py, system.py, data.py); the YAMLs use them.
GUIDANCE_NAME = "piva-guidance"
EDIT_SYSTEM_NAME = "piva-edit-system"
RECONSTRUCTION_SYSTEM_NAME = "piva-reconstruction-system"
DATAMODULE_NAME = "piva-blender-datamodule"
REGISTERED = (GUIDANCE_NAME, EDIT_SYSTEM_NAME, RECONSTRUCTION_SYSTEM_NAME, DATAMODULE_NAME)

INSTALL_HINT = (
    "install the extension with `python -m piva.threestudio.install /path/to/threestudio` "
    "and run it through threestudio's launch.py"
)


def require_threestudio(what: str) -> None:
    """Fail with one line (not a traceback through threestudio's imports) when threestudio cannot be imported."""
    try:
        import threestudio  # noqa: F401
    except ImportError as exc:  # includes threestudio's own missing deps (tinycudann, nerfacc, lightning)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportError(f"{what} needs threestudio, which cannot be imported here ({reason}): {INSTALL_HINT}") from None


# -- configuration ---------------------------------------------------------------


def _omegaconf_type(tp: Any) -> Any:
    """OmegaConf (threestudio's configs) has no Literal: a Literal of strings is read as str."""
    return str if get_origin(tp) is Literal else tp


# threestudio's own fields of `system.guidance` beside GuidanceConfig's: the model ids, the
# precision and how the render's depth becomes the ControlNet's input.
_THREESTUDIO_FIELDS = [
    ("pretrained_model_name_or_path", str, field(default=DEFAULT_MODEL)),
    ("controlnet_name_or_path", str, field(default=DEFAULT_CONTROLNET)),
    # float32 | float16 | bfloat16; None: fp32 on CPU, bf16/fp16 on GPU
    ("dtype", Optional[str], field(default=None)),
    # pixels less opaque than this are background for the depth ControlNet
    ("min_opacity", float, field(default=0.5)),
    # the paper edits without it; piva-guidance has none
    ("view_dependent_prompting", bool, field(default=False)),
]

# The fields of `system.guidance` for `piva-guidance` (threestudio's Config mixes these in):
# GuidanceConfig's own fields, generated from it so the two never drift apart, plus the
# threestudio-only ones above. Plain types only, so OmegaConf can build it from YAML.
_GUIDANCE_TYPES = get_type_hints(GuidanceConfig)
GuidanceSettings = make_dataclass(
    "GuidanceSettings",
    [(f.name, _omegaconf_type(_GUIDANCE_TYPES[f.name]), field(default=f.default)) for f in fields(GuidanceConfig)]
    + _THREESTUDIO_FIELDS,
    namespace={"__module__": __name__},
)


GUIDANCE_FIELDS = tuple(f.name for f in fields(GuidanceConfig))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _plain(value: Any) -> Any:
    """OmegaConf containers -> Python lists/dicts (without importing omegaconf)."""
    if hasattr(value, "items") and not isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def settings_dict(settings: Union[GuidanceSettings, Mapping[str, Any], Any]) -> dict:
    """A plain dict of guidance settings from the dataclass, a dict or an OmegaConf node."""
    if isinstance(settings, GuidanceSettings):
        return asdict(settings)
    if isinstance(settings, Mapping) or hasattr(settings, "items"):
        return _plain(settings)
    return {f.name: _plain(getattr(settings, f.name)) for f in fields(GuidanceSettings) if hasattr(settings, f.name)}


def guidance_config(settings: Union[GuidanceSettings, Mapping[str, Any], Any]) -> GuidanceConfig:
    """Build (and validate) piva's GuidanceConfig from a `system.guidance` section.

    Validation runs here so a bad prompt or mode fails before any model is loaded.
    """
    raw = settings_dict(settings)
    unknown = set(raw) - {f.name for f in fields(GuidanceSettings)}
    if unknown:
        raise ValueError(f"unknown piva-guidance settings: {', '.join(sorted(unknown))}")
    if raw.get("view_dependent_prompting"):
        raise ValueError(
            "piva-guidance has no view-dependent prompting (the paper edits without it): set view_dependent_prompting=false"
        )
    if raw.get("mode", "piva") not in MODES:
        raise ValueError(f"unknown guidance mode {raw.get('mode')!r}: choose one of {', '.join(MODES)}")
    kwargs = {k: raw[k] for k in GUIDANCE_FIELDS if k in raw}
    for key in ("t_range", "annealed_range"):
        if key in kwargs:
            kwargs[key] = tuple(float(v) for v in kwargs[key])
    config = GuidanceConfig(**kwargs)
    config.validate()
    return config


def needs_original(config: GuidanceConfig) -> bool:
    """Whether a step needs the ORIGINAL scene's render: PiVa's source adapter, or DDS with the true source latent."""
    return config.mode == "piva" or (config.mode != "sds" and not config.uses_same_latent)


# -- tensor layout ---------------------------------------------------------------


def channels_first(rgb: torch.Tensor, what: str = "render") -> torch.Tensor:
    """threestudio's [B,H,W,3] -> piva's [B,3,H,W] (contiguous, so convolutions see the usual layout)."""
    if not isinstance(rgb, torch.Tensor) or rgb.dim() != 4 or rgb.shape[-1] != 3:
        shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ValueError(f"{what} must be threestudio's channels-last [B,H,W,3], got {shape}")
    return rgb.permute(0, 3, 1, 2).contiguous()


def depth_for_control(
    depth: torch.Tensor, opacity: Optional[torch.Tensor] = None, min_opacity: float = 0.5
) -> torch.Tensor:
    """threestudio depth [B,H,W,1] (+ opacity) -> [B,1,H,W] with inf on background.

    threestudio's volume renderers return sum(weight * t), which is not divided by
    the opacity: a half-transparent pixel reads twice as near. Dividing by the
    opacity gives the surface distance; pixels below `min_opacity` are background
    (inf), which `piva.guidance.depth_to_control` paints black as depth ControlNets expect.
    """
    if depth.dim() != 4 or depth.shape[-1] != 1:
        raise ValueError(f"depth must be threestudio's [B,H,W,1], got {tuple(depth.shape)}")
    d = depth.detach().float()
    if opacity is not None:
        if opacity.shape != depth.shape:
            raise ValueError(f"opacity {tuple(opacity.shape)} does not match depth {tuple(depth.shape)}")
        a = opacity.detach().float()
        d = torch.where(a >= min_opacity, d / a.clamp_min(1e-6), torch.full_like(d, float("inf")))
    return d.permute(0, 3, 1, 2).contiguous()


# -- the guidance, channels-last -------------------------------------------------


class ChannelsLastGuidance:
    """`ScoreDistillation` for threestudio's renders: converts inputs, returns threestudio-style dicts.

    Everything that is the method (scores, schedule, adapters) stays in `self.distillation`.
    """

    def __init__(self, distillation: ScoreDistillation, min_opacity: float = 0.5) -> None:
        self.distillation = distillation
        self.min_opacity = min_opacity

    @classmethod
    def from_settings(
        cls,
        settings: Union[GuidanceSettings, Mapping[str, Any], Any],
        device: Optional[Union[str, torch.device]] = None,
        prior: Optional[DiffusionPrior] = None,
    ) -> "ChannelsLastGuidance":
        """Validate the settings, then load the diffusion model (and the ControlNet for PiVa) and build the guidance."""
        raw = settings_dict(settings)
        config = guidance_config(raw)
        if prior is None:
            dtype_name = raw.get("dtype")
            if dtype_name is not None and dtype_name not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or null, got {dtype_name!r}")
            wants_controlnet = config.mode == "piva" and config.use_controlnet
            prior = DiffusionPrior.from_pretrained(
                raw.get("pretrained_model_name_or_path", DEFAULT_MODEL),
                controlnet=raw.get("controlnet_name_or_path", DEFAULT_CONTROLNET) if wants_controlnet else None,
                device=device,
                dtype=DTYPES.get(dtype_name or ""),
            )
        return cls(ScoreDistillation(prior, config), min_opacity=float(raw.get("min_opacity", 0.5)))

    @property
    def config(self) -> GuidanceConfig:
        return self.distillation.config

    @property
    def loss_name(self) -> str:
        """`loss_piva`, `loss_dds` or `loss_sds`: threestudio systems weight it by `system.loss.lambda_<mode>`."""
        return f"loss_{self.config.mode}"

    @property
    def needs_original(self) -> bool:
        return needs_original(self.config)

    def image(self, rgb: torch.Tensor, what: str = "render") -> torch.Tensor:
        x = self.distillation.fit_to_model(channels_first(rgb, what))
        return x.clamp(0, 1)  # volume rendering can overshoot 1 by rounding; clamp keeps in-range gradients

    def depth(self, depth: Optional[torch.Tensor], opacity: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if depth is None:
            return None
        d = depth_for_control(depth, opacity, self.min_opacity)
        return self.distillation.fit_to_model(d, mode="nearest")

    def __call__(
        self,
        rgb: torch.Tensor,
        *,
        depth: Optional[torch.Tensor] = None,
        opacity: Optional[torch.Tensor] = None,
        source_rgb: Optional[torch.Tensor] = None,
        step: int = 0,
        generator: Optional[torch.Generator] = None,
        t: Optional[int] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict:
        """One score-distillation step on a channels-last render; the loss backpropagates into it."""
        true_source = self.config.mode != "sds" and not self.config.uses_same_latent
        if true_source and source_rgb is None:
            raise ValueError(f"{self.config.mode} with same_latent=false needs the original scene's render (source_rgb)")
        src = self.image(source_rgb.detach(), "original render") if true_source else None
        out = self.distillation.step(
            self.image(rgb),
            depth=self.depth(depth, opacity),
            source_rgb=src,
            step=step,
            generator=generator,
            t=t,
            noise=noise,
        )
        extra = {k: v for k, v in out.diagnostics.items() if k not in ("grad_norm", "t")}
        return {self.loss_name: out.loss, "grad_norm": out.grad.norm(), "timestep": out.t, **extra}

    def update_adapters(
        self,
        rgb: torch.Tensor,
        *,
        depth: Optional[torch.Tensor] = None,
        opacity: Optional[torch.Tensor] = None,
        source_rgb: Optional[torch.Tensor] = None,
        source_depth: Optional[torch.Tensor] = None,
        source_opacity: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """PiVa's adapter step (eq. 7, 8) on the current and the original render; {} for SDS/DDS."""
        if self.distillation.adapters is None:
            return {}
        if source_rgb is None:
            raise ValueError("PiVa's adapter update needs the original scene's render (source_rgb)")
        return self.distillation.update_adapters(
            self.image(rgb.detach()),
            depth=self.depth(depth, opacity),
            source_rgb=self.image(source_rgb.detach(), "original render"),
            source_depth=self.depth(source_depth, source_opacity),
            generator=generator,
        )

    # -- checkpoints: the adapters are not threestudio modules, so they travel by hand --
    def adapter_state(self) -> Optional[dict]:
        """Both adapters' weights and optimizer state, or None without adapters."""
        a = self.distillation.adapters
        return None if a is None else a.state()

    def load_adapter_state(self, state: Mapping[str, Any]) -> None:
        a = self.distillation.adapters
        if a is None:
            raise ValueError("this checkpoint holds PiVa adapters but the guidance mode has none: resume with mode=piva")
        a.load_state(dict(state))


# -- Blender-layout datasets (NeRF synthetic, Noe's prepared views) ---------------


@dataclass
class BlenderDataSettings:
    """The fields of `data` for `piva-blender-datamodule`."""

    dataroot: str = ""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    background_color: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # the images' alpha is composited on this
    rays_per_batch: int = 4096  # random rays (from all training images) per step
    n_val_views: int = 4  # evenly spaced views of the val split rendered at each validation
    eval_downsample: int = 1  # render val/test views at 1/eval_downsample resolution


@dataclass
class Views:
    """Cameras of one split: OpenGL camera-to-world (z-up world, as threestudio and Blender use) and pinhole intrinsics."""

    c2w: torch.Tensor  # [N,4,4]
    intrinsics: torch.Tensor  # [N,4]: fx, fy, cx, cy in pixels
    width: int
    height: int
    image_paths: List[Path]


def _image_path(root: Path, file_path: str) -> Path:
    p = (root / file_path).resolve()
    if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file():
        return p
    for ext in (".png", ".jpg", ".jpeg"):
        if p.with_name(p.name + ext).is_file():
            return p.with_name(p.name + ext)
    return p


def read_views(root: Union[str, Path], split: str = "train") -> Views:
    """Read `transforms_<split>.json` (Blender: camera_angle_x) or `transforms.json` (fl_x/fl_y/cx/cy).

    Poses are kept exactly as written: the object stays at the origin, where
    threestudio's random and evaluation cameras look (threestudio's own multiview
    loader re-centres on the mean camera position, which moves an object seen
    from the upper hemisphere off the origin).
    """
    root = Path(root)
    path = root / f"transforms_{split}.json"
    if not path.is_file():
        path = root / "transforms.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} has neither transforms_{split}.json nor transforms.json: expected a Blender-layout dataset"
        )
    meta = json.loads(path.read_text())
    frames = meta.get("frames") or []
    if not frames:
        raise ValueError(f"{path} lists no frames")
    model = meta.get("camera_model", "PINHOLE")
    if model not in ("PINHOLE", "OPENCV", "SIMPLE_PINHOLE"):
        raise ValueError(f"{path}: camera_model {model!r} is not a pinhole camera")
    if any(abs(float(meta.get(k, 0.0))) > 1e-9 for k in ("k1", "k2", "k3", "p1", "p2")):
        raise ValueError(f"{path}: lens distortion is not supported; undistort the images first")
    paths = [_image_path(root, f["file_path"]) for f in frames]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {path.name} are missing, e.g. {missing[0]}")
    w, h = meta.get("w"), meta.get("h")
    if w is None or h is None:
        import imageio.v3 as iio

        h, w = iio.improps(paths[0]).shape[:2]
    w, h = int(w), int(h)
    intr = []
    for f in frames:
        if "camera_angle_x" in meta or "camera_angle_x" in f:
            angle = float(f.get("camera_angle_x", meta.get("camera_angle_x")))
            fx = 0.5 * w / math.tan(0.5 * angle)
            fy = fx
            if "camera_angle_y" in meta:
                fy = 0.5 * h / math.tan(0.5 * float(meta["camera_angle_y"]))
            cx, cy = w / 2.0, h / 2.0
        else:
            get = lambda k: float(f.get(k, meta.get(k)))  # noqa: E731 - per-frame value or the shared one
            fx, fy, cx, cy = get("fl_x"), get("fl_y"), get("cx"), get("cy")
        intr.append([fx, fy, cx, cy])
    c2w = torch.tensor([f["transform_matrix"] for f in frames], dtype=torch.float32)
    if c2w.shape[1:] != (4, 4):
        raise ValueError(f"{path}: transform_matrix must be 4x4, got {tuple(c2w.shape[1:])}")
    return Views(c2w, torch.tensor(intr, dtype=torch.float32), w, h, paths)


def pixel_rays(
    c2w: torch.Tensor, intrinsics: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centres (u, v) of cameras c2w [...,4,4]; OpenGL camera (looks down -z, y up).

    Returns origins and unit directions, so the renderer's depth is the distance along the ray.
    """
    fx, fy, cx, cy = intrinsics.unbind(-1)
    d_cam = torch.stack([(u + 0.5 - cx) / fx, -(v + 0.5 - cy) / fy, -torch.ones_like(u)], dim=-1)
    d = (c2w[..., :3, :3] @ d_cam.unsqueeze(-1)).squeeze(-1)
    d = F.normalize(d, dim=-1)
    o = c2w[..., :3, 3].expand_as(d)
    return o, d


def image_rays(c2w: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """All rays of one camera as [H,W,3] origins and directions."""
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    return pixel_rays(c2w.expand(height, width, 4, 4), intrinsics.expand(height, width, 4), u, v)


def load_rgba(path: Union[str, Path], background: Sequence[float] = (1.0, 1.0, 1.0)) -> Tuple[torch.Tensor, torch.Tensor]:
    """An image as RGB [H,W,3] in [0,1] composited on `background`, and its alpha [H,W,1] (ones without alpha)."""
    import imageio.v3 as iio

    img = torch.from_numpy(iio.imread(path)).float() / 255.0
    if img.dim() == 2:
        img = img[..., None].repeat(1, 1, 3)
    rgb, alpha = img[..., :3], (img[..., 3:4] if img.shape[-1] == 4 else torch.ones_like(img[..., :1]))
    bg = torch.tensor(list(background), dtype=torch.float32)
    return rgb * alpha + bg * (1 - alpha), alpha
