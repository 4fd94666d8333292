"""threestudio front end: edit Noe / synthetic objects with `launch.py` and YAML configs.

Install into a threestudio checkout (links `custom/threestudio-piva/`, checks versions):

    python -m piva.threestudio.install /path/to/threestudio

then, from the checkout:

    python launch.py --config custom/threestudio-piva/configs/piva-noe.yaml --train \\
        system.geometry_convert_from=SOURCE_RUN/ckpts/last.ckpt \\
        system.guidance.source_prompt="..." system.guidance.target_prompt="..."

Modules free of threestudio: `config` (registered names, the `system.guidance`
section generated from GuidanceConfig), `glue` (channels-last renders to
`piva.guidance`), `blender` (Blender-layout datasets on piva.data's cameras) and
`install`; the threestudio modules `guidance`, `system`, `data` are registered by
importing `extension`. This package itself imports without threestudio, so the
installer and the glue work anywhere; the registered modules fail with one line
when threestudio is missing. See README.md in this folder.
"""
