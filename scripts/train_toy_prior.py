#!/usr/bin/env python
"""Train the toy world's prior (VAE, UNet, depth ControlNet) and judge on CPU, fixed seed.

    .venv/bin/python scripts/train_toy_prior.py            # full run, ~55 min on 2 cores
    .venv/bin/python scripts/train_toy_prior.py --quick    # smoke test, ~1 min, to a scratch folder

Writes piva/toyworld/weights/{prior,controlnet,judge,training.json}; the folder is
swapped in only when everything is done, so a killed run leaves the old weights.
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from piva.toyworld.judge import WEIGHTS  # noqa: E402
from piva.toyworld.train import ToyTrainConfig, train_toy_world  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--out", type=Path, default=None)
ap.add_argument("--quick", action="store_true", help="a few steps of each part, to check the pipeline")
for f in dataclasses.fields(ToyTrainConfig):
    ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
args = ap.parse_args()
cfg = ToyTrainConfig()
if args.quick:
    cfg = ToyTrainConfig(images=400, vae_steps=10, unet_steps=10, controlnet_steps=5, judge_steps=10)
cfg = dataclasses.replace(cfg, **{f.name: getattr(args, f.name) for f in dataclasses.fields(cfg) if getattr(args, f.name) is not None})
out = args.out or (Path("/tmp/piva-toy-quick") if args.quick else WEIGHTS)
report = train_toy_world(out, cfg)
print(json.dumps(report, indent=2))
print(f"wrote {out}")
