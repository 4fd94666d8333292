#!/usr/bin/env python
"""Print the toy world's quality bar: prior samples follow colour/shape (judge + exact colour check),
ControlNet samples follow depth (silhouette IoU), and the judge's held-out accuracy.

    .venv/bin/python scripts/toy_quality.py [--samples 8]   # ~3 min on 2 cores
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from piva.toyworld.quality import measure  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--samples", type=int, default=8, help="samples per prompt (18 colour x shape prompts)")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
figures = measure(samples_per_prompt=args.samples, seed=args.seed)
print(json.dumps(figures, indent=2))
bar = {"colour_accuracy_exact": 0.90, "shape_accuracy_judge": 0.80}
for k, v in bar.items():
    print(f"{k}: {figures[k]:.3f} (bar {v:.2f}) {'OK' if figures[k] >= v else 'BELOW BAR'}")
