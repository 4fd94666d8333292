#!/usr/bin/env python
"""The paper's 2D experiment in miniature on the toy world: appearance, addition and shape edits
with SDS, DDS and PiVa over a few seeds; prints a table per method and edit type.

    .venv/bin/python scripts/toy_edit_experiment.py [--steps 300] [--seeds 0 1 2] [--out outputs/toy2d]
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from piva.toyworld.experiment import markdown, run_experiment  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--out", type=Path, default=Path("outputs/toy2d"))
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--lr", type=float, default=0.01)
ap.add_argument("--identity-weight", type=float, default=0.4)
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
ap.add_argument("--methods", nargs="+", default=["sds", "dds", "piva"])
ap.add_argument("--same-latent", choices=["default", "on", "off"], default="default",
                help="DDS source branch on the same noised latent (PiVa's default) or the source's own")
args = ap.parse_args()
result = run_experiment(args.out, methods=args.methods, seeds=args.seeds, steps=args.steps, lr=args.lr,
                        identity_weight=args.identity_weight,
                        same_latent={"default": None, "on": True, "off": False}[args.same_latent])
print(markdown(result["summary"], result["settings"]))
