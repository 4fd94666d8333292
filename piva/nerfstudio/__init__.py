"""nerfstudio front end: `ns-train piva | piva-object | piva-dds | piva-sds | piva-small` edit a trained nerfacto scene.

Files, one role each: piva_config (method specifications), piva_pipeline (the edit
loop), piva_model (offline-safe nerfacto), piva_trainer (checkpoints and resume),
runs (source scenes and edits built from the registered methods, sized by the caller),
views (load a finished run and render it at any cameras).
"""
