"""Registered names and the `system.guidance` section of the threestudio front end (no threestudio needed).

The section's fields are generated from `piva.guidance.GuidanceConfig`, so every option of
the method reaches the YAML with the same default; `guidance_config` turns a section back
into a validated `GuidanceConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, field, fields, make_dataclass
from typing import Any, Literal, Mapping, Optional, Union, get_origin, get_type_hints

from piva.guidance import MODES, GuidanceConfig
from piva.prior import DEFAULT_CONTROLNET, DEFAULT_MODEL
from piva.prior.loading import DTYPES

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


def _plain(value: Any) -> Any:
    """OmegaConf containers -> Python lists/dicts (without importing omegaconf)."""
    if isinstance(value, dict) or hasattr(value, "items"):
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
    if raw.get("dtype") is not None and raw["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or null, got {raw['dtype']!r}")
    kwargs = {k: raw[k] for k in GUIDANCE_FIELDS if k in raw}
    for key in ("t_range", "annealed_range"):
        if key in kwargs:
            kwargs[key] = tuple(float(v) for v in kwargs[key])
    config = GuidanceConfig(**kwargs)
    config.validate()
    return config


def needs_original(config: GuidanceConfig) -> bool:
    """Whether a step needs the ORIGINAL scene's render: PiVa's source adapter, or DDS with the true source latent."""
    return config.mode == "piva" or config.uses_source_latent
