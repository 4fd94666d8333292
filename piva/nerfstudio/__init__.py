"""nerfstudio front end: `ns-train piva | piva-dds | piva-small` edit a trained nerfacto scene.

Files, one role each: piva_config (method specifications), piva_pipeline (the edit
loop), piva_model (offline-safe nerfacto), piva_trainer (checkpoints and resume).
"""
