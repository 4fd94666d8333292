"""Loading the frozen diffusion prior (hub id or local diffusers folder)."""

from piva.prior.loading import DEFAULT_CONTROLNET, DEFAULT_MODEL, DiffusionPrior, ModelNotFoundError, resolve_model_dir

__all__ = ["DEFAULT_CONTROLNET", "DEFAULT_MODEL", "DiffusionPrior", "ModelNotFoundError", "resolve_model_dir"]
