#!/usr/bin/env bash
# One-command set-up on a fresh machine (Python 3.11 + pip): a .venv with piva and the
# pinned CPU working set (nerfstudio, diffusers, peft, open_clip, lpips). GPU users can
# instead `pip install -e .[nerfstudio,metrics]` into an environment with their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The pinned set is installed first, then piva itself without re-resolving.
.venv/bin/python -m pip install -q -c requirements/cpu-constraints.txt \
  -r requirements/cpu-constraints.txt
.venv/bin/python -m pip install -q --no-deps -e .
# The extras a user adds (Ray for clusters, face identity) resolve against the same pins: checked here.
.venv/bin/python -m pip install -q -c requirements/cpu-constraints.txt -e ".[ray,faces]"
.venv/bin/python -c "import piva, diffusers, peft, nerfstudio, open_clip, ray, dlib; print('piva set-up OK:', piva.__version__)"
