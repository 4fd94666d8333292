"""Registers piva's modules with threestudio: what `custom/threestudio-piva/__init__.py` imports.

    piva-guidance               SDS / DDS / PiVa (piva.guidance)          guidance.py
    piva-edit-system            edits a trained scene                     system.py
    piva-reconstruction-system  trains the source scene from posed images system.py
    piva-blender-datamodule     Blender-layout posed images               data.py

Without threestudio this import fails with one line saying so.
"""

from piva.threestudio.config import require_threestudio

require_threestudio("piva.threestudio.extension")

from piva.threestudio import data, guidance, system  # noqa: E402,F401  (importing registers them)
from piva.threestudio.config import REGISTERED  # noqa: E402,F401
