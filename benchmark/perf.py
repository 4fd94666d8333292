"""Per-step cost of SDS, DDS and PiVa on one tiny model, measured side by side.

Prints UNet/ControlNet forward calls and rows per step, aten operators dispatched per
step (what a launch-bound GPU pays for), and the time per step as a ratio to DDS. A "step" is what an editing loop does once: encode the render,
score it, backpropagate into the render, and (PiVa) update both adapters.

    .venv/bin/python benchmark/perf.py [--steps 20] [--size 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from piva.guidance import GuidanceConfig, ScoreDistillation  # noqa: E402
from piva.prior import DiffusionPrior  # noqa: E402
from piva.prior.tiny import build_tiny_prior  # noqa: E402
from real_size import count_ops  # noqa: E402  (benchmark/, beside this script)


def count_calls(prior: DiffusionPrior) -> Counter:
    counts: Counter = Counter()
    for name, model in (("unet", prior.unet), ("controlnet", prior.controlnet)):
        if model is None:
            continue

        def hook(module, args, kwargs, output, name=name):
            counts[f"{name} calls"] += 1
            counts[f"{name} rows"] += args[0].shape[0] if args else kwargs["sample"].shape[0]
            counts[f"{name} rows with grad"] += args[0].shape[0] if torch.is_grad_enabled() else 0

        model.register_forward_hook(hook, with_kwargs=True)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64, help="render side in pixels")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp()) / "tiny"
    build_tiny_prior(root, block_out_channels=(32, 64, 64), sample_size=args.size // 2)

    cases = {
        "sds": dict(mode="sds"),
        "dds": dict(mode="dds"),  # true source latent (original DDS)
        "dds same-latent": dict(mode="dds", same_latent=True),
        "piva 2D (UNet LoRA)": dict(mode="piva", use_controlnet=False),
        "piva 3D, peft's mixed-batch routing": dict(mode="piva", adapter_routing="peft"),
        "piva 3D (+depth ControlNet)": dict(mode="piva"),
    }
    runs = {}
    for name, kw in cases.items():
        prior = DiffusionPrior.from_pretrained(root, controlnet=root / "controlnet", device=args.device)
        sd = ScoreDistillation(prior, GuidanceConfig(source_prompt="a red cube", target_prompt="a blue cube", **kw))
        counts = count_calls(prior)
        runs[name] = (sd, counts, [], [])
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, args.size, args.size, generator=g).to(args.device)
    depth = (torch.rand(1, 1, args.size, args.size, generator=g) + 2).to(args.device)

    def one_step(sd: ScoreDistillation, i: int) -> float:
        """Returns the seconds spent in the adapter update (eq. 7/8)."""
        x = x0.clone().requires_grad_(True)
        out = sd.step(x, depth=depth, source_rgb=x0, step=i, generator=g)
        out.loss.backward()
        t0 = time.perf_counter()
        sd.update_adapters(x.detach(), depth=depth, source_rgb=x0, source_depth=depth, generator=g)
        return time.perf_counter() - t0

    for sd, *_ in runs.values():  # warm-up
        one_step(sd, 0)
    ops = {name: count_ops(sd, x0, x0, depth, 1) for name, (sd, *_) in runs.items()}
    for _, counts, *_ in runs.values():
        counts.clear()
    for i in range(args.steps):  # interleaved so that machine noise hits every method alike
        for sd, _, times, update_times in runs.values():
            t0 = time.perf_counter()
            update_times.append(one_step(sd, i))
            times.append(time.perf_counter() - t0)

    base = median(runs["dds"][2])
    base_ops = ops["dds"]["ops"]
    print(f"{args.steps} steps, {args.size}x{args.size} render, tiny UNet (32,64,64), device {args.device}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| method | UNet calls/step | UNet rows/step (with grad) | ControlNet calls/step | ControlNet rows/step "
          "| aten ops/step: score + update (× DDS) | ms/step (median) | of which adapter update | × DDS "
          "| × DDS without update |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (_, c, times, update_times) in runs.items():
        med, upd = median(times), median(update_times)
        n = args.steps
        print(f"| {name} | {c['unet calls'] / n:.0f} | {c['unet rows'] / n:.0f} ({c['unet rows with grad'] / n:.0f}) "
              f"| {c['controlnet calls'] / n:.0f} | {c['controlnet rows'] / n:.0f} "
              f"| {ops[name]['score_ops']:,} + {ops[name]['adapter_ops']:,} ({ops[name]['ops'] / base_ops:.1f}) "
              f"| {1000 * med:.1f} | {1000 * upd:.1f} "
              f"| {med / base:.2f} | {(med - upd) / base:.2f} |")


def median(xs: list) -> float:
    return sorted(xs)[len(xs) // 2]


if __name__ == "__main__":
    main()
